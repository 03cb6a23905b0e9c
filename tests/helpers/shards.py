"""Damage tar shards in controlled ways, for the bad-data tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def replace_member(shard: Path, name_prefix: str, extension: str, data: bytes) -> None:
    """Rewrite `shard` with the member `{name_prefix}*.{extension}` replaced by `data`."""
    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            content = tar.extractfile(info).read()
            if info.name.startswith(name_prefix) and info.name.endswith("." + extension):
                content = data
            members.append((info, content))
    with tarfile.open(shard, "w") as tar:
        for info, content in members:
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def truncate(shard: Path, num_bytes: int) -> None:
    shard.write_bytes(shard.read_bytes()[:num_bytes])


NOT_A_JPEG = b"\xff\xd8 this is not a jpeg"
