"""Atomic checkpoint files in the official naming scheme, with retention.

Files in `logging.folder`:
- `{tag}-latest.pth.tar`: the newest checkpoint (always kept);
- `{tag}-ep{N}.pth.tar`: state after N completed epochs (the official files hold N-1);
- `{tag}-step{S}.pth.tar`: state after S global steps (checkpoint.every_steps).

A file is written under a temporary name, fsynced, then renamed, so a crash
mid-write never leaves a truncated file under a final name.  The periodic file
and `latest` are the same bytes: latest is a hard link when the filesystem
allows it.

Under distributed.parallel=fsdp a checkpoint is a torch.distributed.checkpoint (DCP) folder with the
same stem, `{tag}-ep{N}.dcp/` or `{tag}-step{S}.dcp/` (`{tag}-latest-step{S}.dcp/` when only
latest is kept): every rank writes its own shard file, rank 0 writes `.metadata` and
`trainer.pt` (steps, schedules, per-rank data-stream and RNG state, config), and only after all
of that the `COMMITTED` marker.  `{tag}-latest.dcp` is a symlink that is only ever pointed at a
committed folder; folders without the marker (a crash mid-save) are never read and are removed
by the next save.  `dcp.consolidate(folder)` turns one into the single-file layout.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import safe_load
from .dcp import COMMIT_MARKER, DCP_SUFFIX, TRAINER_STATE, consolidate, is_committed, is_dcp_checkpoint
from ..errors import UserError
from ..fileutil import atomic_write, fsync_dir

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


def run_folder_latest(folder: str | Path) -> list[Path]:
    """A run folder's newest checkpoint: its `*-latest.pth.tar` files, else its `*-latest.dcp` folders
    (exactly one is expected; callers say what to do otherwise)."""
    folder = Path(folder)
    return sorted(folder.glob("*-latest.pth.tar")) or sorted(folder.glob("*-latest.dcp"))


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or (is_dcp_checkpoint(path) and is_committed(path))


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
        self._periodic = re.compile(rf"^{re.escape(tag)}-(ep|step)(\d+)(\.pth\.tar|\.dcp)$")
        self._latest_only = re.compile(rf"^{re.escape(tag)}-latest-step(\d+)\.dcp$")

    @property
    def latest(self) -> Path:
        return self.folder / f"{self.tag}-latest.pth.tar"

    @property
    def latest_dcp(self) -> Path:
        return self.folder / f"{self.tag}-latest{DCP_SUFFIX}"

    def current_latest(self) -> Optional[Path]:
        """The newest committed checkpoint: the latest file or the folder latest.dcp points at. When both
        exist (a run that switched distributed.parallel, before its next save removed the other) the higher step
        recorded inside wins: modification times do not survive every copy."""
        found = []
        if self.latest.is_file():
            found.append(self.latest)
        if self.latest_dcp.is_symlink() and is_committed(self.latest_dcp):
            found.append(self.latest_dcp.resolve())
        if len(found) < 2:
            return found[0] if found else None
        return max(found, key=_recorded_step)

    def latest_step(self) -> Optional[int]:
        """The step the newest committed checkpoint records; None without one."""
        latest = self.current_latest()
        return None if latest is None else _recorded_step(latest)

    def _remove_latest_dcp(self) -> None:
        """Drop latest.dcp (superseded by a newer latest file) and the latest-only folder it points at."""
        if not self.latest_dcp.is_symlink():
            return
        target = self.latest_dcp.resolve()
        self.latest_dcp.unlink()
        if self._latest_only.match(target.name):
            shutil.rmtree(target, ignore_errors=True)
        fsync_dir(self.folder)

    def dcp_path(self, periodic: Optional[Path], step: int) -> Path:
        if periodic is None:
            return self.folder / f"{self.tag}-latest-step{step}{DCP_SUFFIX}"
        return periodic.with_name(periodic.name[: -len(".pth.tar")] + DCP_SUFFIX)

    def begin_dcp(self, path: Path) -> None:
        """Rank 0, before every rank writes into `path`: clear it and any folder a crash left uncommitted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob(f"{self.tag}-*{DCP_SUFFIX}"):
            if old.is_dir() and not old.is_symlink() and (old == path or not is_committed(old)):
                shutil.rmtree(old, ignore_errors=True)
        path.mkdir()

    def commit_dcp(self, path: Path, periodic: bool) -> None:
        """Rank 0, after every rank's shard and the metadata are written: mark, point latest, retention."""
        atomic_write(path / COMMIT_MARKER, lambda f: f.write(b"ok\n"), tmp_prefix=COMMIT_MARKER + TMP_MARK)
        tmp = self.latest_dcp.with_name(self.latest_dcp.name + TMP_MARK + "link")
        tmp.unlink(missing_ok=True)
        os.symlink(path.name, tmp)
        os.replace(tmp, self.latest_dcp)
        self.latest.unlink(missing_ok=True)  # superseded: latest is this folder now
        fsync_dir(self.folder)
        for old in self.folder.glob(f"{self.tag}-latest-step*{DCP_SUFFIX}"):
            if old != path and self._latest_only.match(old.name):
                shutil.rmtree(old, ignore_errors=True)
        if periodic:
            self._apply_retention(keep=path)

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
        self._remove_latest_dcp()
        self.remove_stale_temporaries()
        return periodic or self.latest

    def periodic_files(self) -> list[Path]:
        found = []
        for path in self.folder.glob(f"{self.tag}-*"):
            match = self._periodic.match(path.name)
            if match and (path.is_file() or is_committed(path)):
                stamp = path if path.is_file() else path / COMMIT_MARKER
                found.append((stamp.stat().st_mtime_ns, path.name, path))
        return [p for _, _, p in sorted(found)]

    def _apply_retention(self, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        files = [p for p in self.periodic_files() if p != keep]
        excess = len(files) + 1 - self.keep_last
        for path in files[: max(0, excess)]:
            logger.info("retention: removing %s", path.name)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
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
        file every time, while pointing at any other file still rolls back to it.  Either
        latest name means this folder's latest of either kind (a save removes the other).
        """
        latest = self.current_latest()
        if read_checkpoint and required:
            path = self.folder / read_checkpoint
            if latest is not None and path in (self.latest, self.latest_dcp):
                return latest
            if Path(read_checkpoint).is_absolute() or not _is_checkpoint(path):
                path = Path(read_checkpoint)
            if not _is_checkpoint(path):
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
        if path.is_dir():
            return safe_load.load(path / TRAINER_STATE)
        return safe_load.load(path, mmap=True)
    except Exception:
        return {}


def _recorded_step(path: Path) -> int:
    """The step a checkpoint records (-1 if it records none, e.g. an official one)."""
    step = _peek(path).get("step")
    return step if isinstance(step, int) else -1


RESUME_HINT = ("resume from another file with meta.load_checkpoint=true meta.read_checkpoint=FILE, "
               "or move this folder away to start from scratch")


def load_checkpoint_file(path: Path) -> dict:
    try:
        state = consolidate(path) if path.is_dir() else safe_load.load(path)
    except safe_load.UnsafeCheckpointError as exc:
        raise UserError(f"{exc}. Refusing to start from scratch: {RESUME_HINT}") from None
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
