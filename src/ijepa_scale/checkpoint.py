"""Atomic checkpoint files in the official naming scheme, with retention.

Files in `logging.folder`:
- `{tag}-latest.pth.tar`: the newest checkpoint (always kept);
- `{tag}-ep{N}.pth.tar`: state after N completed epochs (the official files hold N-1);
- `{tag}-step{S}.pth.tar`: state after S global steps (logging.checkpoint_every_steps).

A file is written under a temporary name, fsynced, then renamed, so a crash
mid-write never leaves a truncated file under a final name.  The periodic file
and `latest` are the same bytes: latest is a hard link when the filesystem
allows it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .fileutil import atomic_write, fsync_dir

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), tmp_prefix=Path(path).name + TMP_MARK)


def _atomic_link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + TMP_MARK + "link")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


class CheckpointFiles:
    def __init__(self, folder: str | Path, tag: str, keep_last: int = 0):
        self.folder = Path(folder)
        self.tag = tag
        self.keep_last = keep_last
        self._periodic = re.compile(rf"^{re.escape(tag)}-(ep|step)(\d+)\.pth\.tar$")

    @property
    def latest(self) -> Path:
        return self.folder / f"{self.tag}-latest.pth.tar"

    def epoch_path(self, epochs_done: int) -> Path:
        return self.folder / f"{self.tag}-ep{epochs_done}.pth.tar"

    def step_path(self, step: int) -> Path:
        return self.folder / f"{self.tag}-step{step}.pth.tar"

    def save(self, state: dict, periodic: Optional[Path]) -> Path:
        """Write `state` to `periodic` (if given) and to latest; apply retention."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if periodic is None:
            atomic_save(state, self.latest)
        else:
            atomic_save(state, periodic)
            _atomic_link_or_copy(periodic, self.latest)
            self._apply_retention(keep=periodic)
        self.remove_stale_temporaries()
        return periodic or self.latest

    def periodic_files(self) -> list[Path]:
        found = []
        for path in self.folder.glob(f"{self.tag}-*.pth.tar"):
            match = self._periodic.match(path.name)
            if match:
                found.append((path.stat().st_mtime_ns, path.name, path))
        return [p for _, _, p in sorted(found)]

    def _apply_retention(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        files = [p for p in self.periodic_files() if p != keep]
        excess = len(files) + 1 - self.keep_last
        for path in files[: max(0, excess)]:
            logger.info("retention: removing %s", path.name)
            path.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        for path in self.folder.glob(f"{self.tag}-*{TMP_MARK}*"):
            path.unlink(missing_ok=True)

    def resolve_resume(self, read_checkpoint: Optional[str], required: bool) -> Optional[Path]:
        """The file to resume from, or None for a fresh start.

        As official, `read_checkpoint` (a file in the folder, or a path) is used only with
        `required` (meta.load_checkpoint); otherwise latest is used when present.  When
        latest itself descends from `read_checkpoint` (its lineage lists that file at that
        step), latest wins: a restarted job continues instead of going back to the same old
        file every time, while pointing at any other file still rolls back to it.
        """
        latest = self.latest if self.latest.is_file() else None
        if read_checkpoint and required:
            path = self.folder / read_checkpoint
            if Path(read_checkpoint).is_absolute() or not path.is_file():
                path = Path(read_checkpoint)
            if not path.is_file():
                raise FileNotFoundError(
                    f"meta.read_checkpoint={read_checkpoint!r}: no such checkpoint (looked in {self.folder})"
                )
            if latest is not None and not latest.samefile(path) and self._descends_from(latest, path):
                logger.info("%s continues from meta.read_checkpoint=%s: resuming from it", latest.name, path.name)
                return latest
            return path
        if read_checkpoint:
            logger.warning("meta.read_checkpoint=%r is ignored without meta.load_checkpoint=true", read_checkpoint)
        if latest is not None:
            return latest
        if required:
            raise FileNotFoundError(
                f"meta.load_checkpoint=true but there is no {self.latest.name} in {self.folder}; "
                f"set meta.read_checkpoint or meta.load_checkpoint=false to start from scratch"
            )
        return None

    @staticmethod
    def _descends_from(later: Path, earlier: Path) -> bool:
        origin = {"file": earlier.name, "step": _peek(earlier).get("step")}
        return origin in _peek(later).get("lineage", [])


def _peek(path: Path) -> dict:
    """A checkpoint's small fields; tensors are memory-mapped, so nothing large is read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}


RESUME_HINT = ("resume from another file with meta.load_checkpoint=true meta.read_checkpoint=FILE, "
               "or move this folder away to start from scratch")


def load_checkpoint_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(
            f"cannot load checkpoint {path}: {type(exc).__name__}: {first_line}. Refusing to start from scratch: "
            f"{RESUME_HINT}"
        ) from None
    if not isinstance(state, dict):
        raise UserError(
            f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint (a dict with encoder, "
            f"predictor, target_encoder, opt); {RESUME_HINT}"
        )
    return state
