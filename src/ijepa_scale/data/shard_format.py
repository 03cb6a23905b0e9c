"""The shard format that training reads and make-shards writes: webdataset-compatible tar shards plus a JSON index.

Each sample is three adjacent tar members: `{key}.{jpg|png|webp}` (encoded image),
`{key}.cls` (class index, ASCII decimal) and `{key}.json` (`{"class", "path"}`).
Shards are `{prefix}-{i:06d}.tar`; the index is `{prefix}-index.json` beside them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from ..fileutil import atomic_write

INDEX_FORMAT = "ijepa-scale-shards"
INDEX_VERSION = 1

IMAGE_EXTS = ("jpg", "png", "webp")


class DatasetError(ValueError):
    """A problem with the user's input (paths, layout, arguments), not a bug."""


def index_path(out_dir: str | os.PathLike, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}-index.json"


def shard_name(prefix: str, shard_idx: int) -> str:
    return f"{prefix}-{shard_idx:06d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    # Fixed metadata makes shards byte-reproducible for the same input.
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(payload))


class ShardWriter:
    """Writes samples into `{out_dir}/{prefix}-{i:06d}.tar`, one shard at a time.

    A shard is written under a temporary name and renamed when complete, so a crash never
    leaves a truncated shard under its final name. Shards are started lazily: `next_shard()`
    after an empty shard is a no-op. Used as a context manager, an exception discards the
    shard in progress.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "train", start_index: int = 0):
        if not prefix or "/" in prefix:
            raise DatasetError(f"invalid shard prefix {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._next_index = start_index
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._final_path: Path | None = None
        self._count = 0
        self._shards: list[dict] = []
        self._closed = False

    def write(self, key: str, data: bytes, ext: str, cls: int, meta: dict | None = None) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key must be non-empty without '.' or '/', got {key!r}")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image extension must be one of {IMAGE_EXTS}, got {ext!r}")
        if self._tar is None:
            self._open_shard()
        _add_member(self._tar, f"{key}.{ext}", data)
        _add_member(self._tar, f"{key}.cls", str(int(cls)).encode("ascii"))
        if meta is not None:
            _add_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self._count += 1

    @property
    def samples_in_shard(self) -> int:
        """Samples written to the shard in progress (0 when none is open)."""
        return self._count if self._tar is not None else 0

    def start_shard(self) -> None:
        """Open the next shard now; unlike a lazily started one it is kept even if empty."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if self._tar is None:
            self._open_shard()

    def next_shard(self) -> None:
        """Finish the current shard; the next write starts a new one."""
        if self._tar is not None:
            self._finish_shard()

    def close(self) -> list[dict]:
        """Finish the last shard; return `[{"url": file name, "num_samples": n}, ...]`."""
        if not self._closed:
            self.next_shard()
            self._closed = True
        return list(self._shards)

    def abort(self) -> None:
        """Discard the shard in progress (finished shards stay)."""
        if self._tar is not None:
            self._tar.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_shard(self) -> None:
        name = shard_name(self.prefix, self._next_index)
        self._final_path = self.out_dir / name
        self._tmp_path = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def _finish_shard(self) -> None:
        self._tar.close()
        with open(self._tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp_path, self._final_path)
        self._shards.append({"url": self._final_path.name, "num_samples": self._count})
        self._tar = None
        self._next_index += 1


def write_index(
    path: str | os.PathLike, shards: list[dict], classes: list[str], extra: dict | None = None
) -> dict:
    """Atomically write the shard index JSON; return the index dict.

    `extra` adds or overrides top-level fields (`prefix`, `class_counts`, `skipped`, ...).
    Shard urls are file names relative to the index's directory.
    """
    path = Path(path)
    for shard in shards:
        if not {"url", "num_samples"} <= set(shard) or os.path.isabs(shard["url"]):
            raise ValueError(f"shard entries need a relative 'url' and 'num_samples': {shard}")
    prefix = path.name[: -len("-index.json")] if path.name.endswith("-index.json") else None
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "prefix": prefix,
        "num_samples": sum(int(s["num_samples"]) for s in shards),
        "shards": [{"url": s["url"], "num_samples": int(s["num_samples"]),
                    **{k: s[k] for k in ("bytes", "sha256") if k in s}} for s in shards],
        "classes": list(classes),
        "class_counts": None,
        "skipped": [],
    }
    index.update(extra or {})
    atomic_write(path, lambda f: f.write(index_text(index).encode()))
    return index


def index_text(index: dict) -> str:
    return json.dumps(index, indent=1) + "\n"


def read_index(path_or_url: str | os.PathLike) -> dict:
    """Read and validate an index written by `write_index` (local path or fsspec URL)."""
    location = os.fspath(path_or_url)
    try:
        if "://" in location and not location.startswith("file://"):
            import fsspec

            with fsspec.open(location, "rt", encoding="utf-8") as f:
                index = json.load(f)
        else:
            local = location[len("file://") :] if location.startswith("file://") else location
            with open(local, encoding="utf-8") as f:
                index = json.load(f)
    except FileNotFoundError as e:
        raise DatasetError(f"shard index not found: {location}") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"shard index is not valid JSON: {location}: {e}") from e
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DatasetError(f"not an {INDEX_FORMAT} index: {location}")
    if index.get("version") != INDEX_VERSION:
        raise DatasetError(
            f"unsupported index version {index.get('version')} (expected {INDEX_VERSION}): "
            f"{location}"
        )
    return index


def shard_urls(index: dict, index_location: str | os.PathLike) -> list[str]:
    """Shard locations resolved against the index's directory (path or URL)."""
    base = os.fspath(index_location)
    if "://" in base:
        root = base.rsplit("/", 1)[0]
        return [f"{root}/{s['url']}" for s in index["shards"]]
    root = Path(base).parent
    return [str(root / s["url"]) for s in index["shards"]]


def existing_outputs(out_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Shards and index already in the local folder `out_dir` under `prefix`."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = sorted(out_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if index_path(out_dir, prefix).exists():
        found.append(index_path(out_dir, prefix))
    return found


def summary_line(index: dict, out_dir: str | os.PathLike) -> str:
    sizes = [s["num_samples"] for s in index["shards"]]
    report = index.get("report", {})
    skipped = ", ".join(f"{n} {why}" for why, n in report.get("skipped", {}).items())
    converted = ", ".join(f"{n} {what}" for what, n in report.get("converted", {}).items())
    return (
        f"wrote {index['num_samples']} samples ({len(index['classes'])} classes) to "
        f"{len(sizes)} shards of {min(sizes)}-{max(sizes)} samples in {out_dir} "
        f"(index {index['prefix']}-index.json); skipped {len(index['skipped'])} unreadable files"
        + (f" ({skipped})" if skipped else "")
        + f"; converted {len(index.get('converted', []))}" + (f" ({converted})" if converted else "")
    )
