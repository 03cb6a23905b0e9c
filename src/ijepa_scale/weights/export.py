"""Write a checkpoint as a Hugging Face `IJepaModel` folder or as the official single file.

The output appears whole or not at all (written under a temporary name beside it, then renamed), an
existing output is replaced only when asked (``overwrite``), and the source is never written over, also
not through a link to it, nor when the output lies inside a source folder (a run, ``.dcp`` or Hugging
Face folder) or would replace a folder holding the source.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fileutil import atomic_write, fsync_dir
from .download import cache_path, default_cache_dir, fetch
from .hf import HF_CONFIG, HF_WEIGHTS, HFStateDict, write_hf
from .load import load_checkpoint, num_heads_of
from .official import infer_encoder_config, refuse_energy_weights, select_state_dict, to_official
from .registry import is_url, resolve_source

FORMATS = ("hf", "official")
KEYS = ("target_encoder", "encoder")


def export(source: str | os.PathLike, out: str | os.PathLike, fmt: str, *, key: str = "target_encoder",
           num_heads: int | None = None, overwrite: bool = False) -> str:
    """Write `source` (anything :func:`~ijepa_scale.weights.load_checkpoint` reads) to `out` in format
    `fmt` (``hf``: a folder holding encoder `key`; ``official``: one ``.pth.tar``); returns what was
    written, in one line. Every refusal is a :class:`UserError` naming the fix."""
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    if key not in KEYS:
        raise UserError(f"key {key!r}: use one of {', '.join(KEYS)}")
    out = Path(out).expanduser()
    source = resolve_source(os.fspath(source))
    # The file to protect; a URL's (or registry name's) is its place in the cache, known before downloading.
    local = cache_path(source, default_cache_dir()) if is_url(source) else fetch(source)
    check_target(local, out, folder=fmt == "hf", overwrite=overwrite)
    _probe_writable(out)  # before downloading or reading a checkpoint, which may take minutes
    checkpoint = load_checkpoint(source)
    try:
        if fmt == "hf":
            return _export_hf(checkpoint, out, key, num_heads)
        return _export_official(checkpoint, out)
    except OSError as exc:
        raise _write_error(out, exc) from None


def check_target(source: Path, out: Path, *, folder: bool, overwrite: bool) -> None:
    """UserError unless writing `out` (a folder if `folder`, else a file) leaves `source` untouched and
    replaces nothing without `overwrite`."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        where = ("is the source" if dst == src
                 else f"{'lies inside' if src in dst.parents else 'holds'} the source {source}")
        raise UserError(f"{out} {where}; export never writes into or over its source: choose an output outside it")
    if not (out.exists() or out.is_symlink()):
        return
    if _file_ids(out) & _file_ids(source):
        raise UserError(f"{out} is a link to the source {source} (or holds one); export never writes over its source: "
                        f"choose another output")
    if folder:
        if not out.is_dir():
            raise UserError(f"{out} is a file, and --format hf writes a folder; choose a new folder name")
        others = sorted(p.name for p in out.iterdir() if p.name not in (HF_CONFIG, HF_WEIGHTS))
        if others:
            raise UserError(f"{out} is a folder holding other files ({', '.join(others[:3])}); --format hf replaces "
                            f"only a Hugging Face model folder ({HF_CONFIG}, {HF_WEIGHTS}): choose a new folder")
        if not any(out.iterdir()):
            return  # an empty folder: nothing to overwrite
    elif out.is_dir():
        raise UserError(f"{out} is a folder, and --format official writes one file; give a file name such as "
                        f"{out / 'official.pth.tar'}")
    if not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it, or choose another name")


def _file_ids(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of `path`, or of every file under it when it is a folder (links followed)."""
    paths = [path]
    if path.is_dir():
        paths = [Path(root, name) for root, _, names in os.walk(path) for name in names]
    ids = set()
    for p in paths:
        try:
            st = p.stat()
        except OSError:  # a dangling link
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def _write_error(out: Path, exc: OSError) -> UserError:
    return UserError(f"cannot write {out} ({exc.strerror or exc}); choose an output where you can write")


def _probe_writable(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise _write_error(out, exc) from None


def _export_hf(checkpoint: Mapping[str, Any], out: Path, key: str, num_heads: int | None) -> str:
    state = select_state_dict(checkpoint, key, "patch_embed.proj.weight")
    refuse_energy_weights(state)
    heads = num_heads or num_heads_of(checkpoint) or infer_encoder_config(state)["num_heads"]
    staging = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        write_hf(state, staging, heads)
        _replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    which = "encoder" if isinstance(checkpoint, HFStateDict) else key
    return (f"wrote {out} ({which}, {heads} heads); load it with "
            f"transformers.IJepaModel.from_pretrained({str(out)!r})")


def _replace_folder(staging: Path, out: Path) -> None:
    """Rename the complete `staging` folder to `out`; an existing `out` (already checked) is set aside
    first and removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_official(checkpoint: Mapping[str, Any], out: Path) -> str:
    if isinstance(checkpoint, HFStateDict):
        checkpoint = {"encoder": checkpoint}
    official = to_official(checkpoint)
    atomic_write(out, lambda f: torch.save(official, f))
    nets = [k for k in ("encoder", "predictor", "target_encoder") if k in official]
    return f"wrote {out} (official format: {', '.join(nets)} with module. prefixes)"
