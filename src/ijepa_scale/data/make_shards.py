"""Convert images into webdataset-compatible tar shards plus a JSON index.

Sources (`--src-format`): an ImageFolder tree (`folder`), a folder of per-synset tars as
ImageNet-22K ships (`synset-tars`), or a `path<TAB>label` file list (`list`). Output: a local
folder or any fsspec URL.

Each sample is three adjacent tar members: `{key}.{jpg|png|webp}` (encoded image),
`{key}.cls` (class index, ASCII decimal) and `{key}.json` (`{"class", "path"}`).
Shards are `{prefix}-{i:06d}.tar`; the index is `{prefix}-index.json` beside them, with
`{prefix}-classes.txt`, `{prefix}-plan.json` and `{prefix}-parts/` (per-shard records, for resume).

    ijepa-scale make-shards --src /data/imagenet/train --out shards/in1k \
        --samples-per-shard 1000 --resize-short-side 512 --workers 16
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import posixpath
import random
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

INDEX_FORMAT = "ijepa-scale-shards"
INDEX_VERSION = 1

IMAGE_EXTS = ("jpg", "png", "webp")
# Source files of these formats are stored byte-for-byte (unless resized).
_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# File suffixes picked up from the source tree (case-insensitive).
SOURCE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
JPEG_QUALITY = 95


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    _atomic_write_text(path, json.dumps(index, indent=1) + "\n")
    return index


def _index_text(index: dict) -> str:
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


# ------------------------------------------------------------------------------------------
# ImageFolder -> shards


@dataclass(frozen=True)
class SourceSample:
    rel_path: str  # POSIX path relative to the source root (for a synset tar: "<tar name>/<member>")
    cls: int
    size: int = 0  # bytes of the source file, when known (plans shards by bytes)
    tar: str | None = None  # synset tars: the tar holding the member, and where its data starts
    offset: int = 0


def list_image_folder(src_root: str | os.PathLike) -> tuple[list[str], list[SourceSample]]:
    """Classes (sorted subdirectory names) and all image files below each, sorted."""
    root = Path(src_root)
    if not root.is_dir():
        raise DatasetError(f"source directory does not exist: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class subdirectories in {root} (expected {root}/<class>/*.jpg)")
    samples: list[SourceSample] = []
    empty: list[str] = []
    for cls, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            found.extend(
                (f"{rel_dir}/{fn}", _file_size(os.path.join(dirpath, fn)))
                for fn in filenames
                if not fn.startswith(".") and fn.lower().endswith(SOURCE_SUFFIXES)
            )
        if not found:
            empty.append(str(root / name))
        samples.extend(SourceSample(p, cls, size) for p, size in sorted(found))
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetError(f"{len(empty)} class directories contain no images: {shown}")
    return classes, samples


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def list_synset_tars(src_dir: str | os.PathLike, num_workers: int = 1) -> tuple[list[str], list[SourceSample], list[dict]]:
    """IN-22K layout: a folder of `<synset>.tar`, each holding that synset's images.

    Classes are the sorted tar names without `.tar`. Returns (classes, samples, problems):
    a tar that cannot be listed to its end keeps the members before the damage and is
    reported; its class stays in the class list (possibly empty).
    """
    root = Path(src_dir)
    if not root.is_dir():
        raise DatasetError(f"source directory does not exist: {root}")
    tars = sorted(e.name for e in os.scandir(root) if e.name.endswith(".tar") and not e.name.startswith("."))
    if not tars:
        raise DatasetError(f"no <synset>.tar files in {root} (expected e.g. {root}/n01440764.tar)")
    classes = [name[: -len(".tar")] for name in tars]
    samples: list[SourceSample] = []
    problems: list[dict] = []
    listings = _map(_list_tar, [str(root / name) for name in tars], num_workers)
    for cls, (name, (members, error)) in enumerate(zip(tars, listings)):
        samples.extend(SourceSample(f"{name}/{m}", cls, size, str(root / name), offset) for m, offset, size in members)
        if error is not None:
            problems.append({"path": name, "error": f"synset tar listed to member {len(members)} only: {error}"})
    return classes, samples, problems


def _list_tar(path: str) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of the image members of a tar, and the error that ended the listing early."""
    members = []
    try:
        file_size = os.stat(path).st_size
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.isreg() and info.name.lower().endswith(SOURCE_SUFFIXES):
                    if info.offset_data + info.size > file_size:
                        raise tarfile.ReadError(f"{info.name} ends past the end of the file (truncated)")
                    members.append((info.name, info.offset_data, info.size))
                tar.members = []
            if tar.offset > file_size:
                raise tarfile.ReadError("truncated")
    except (OSError, tarfile.TarError) as exc:
        return members, f"{type(exc).__name__}: {exc}"
    return members, None


def list_file_list(list_file: str | os.PathLike) -> tuple[list[str], list[SourceSample]]:
    """`path<TAB>label` lines (relative paths are relative to the list's folder).

    Integer labels are class indices (classes "0".."max"); other labels are class names,
    indexed in sorted order."""
    path = Path(list_file)
    if not path.is_file():
        raise DatasetError(f"file list does not exist: {path}")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise DatasetError(f"{path}:{number}: expected 'path<TAB>label', got {line[:80]!r}")
        file, label = line.rsplit("\t", 1)
        entries.append((file.strip(), label.strip()))
    if not entries:
        raise DatasetError(f"file list {path} has no 'path<TAB>label' lines")
    labels = [label for _, label in entries]
    if all(label.isdigit() for label in labels):
        classes = [str(i) for i in range(max(int(label) for label in labels) + 1)]
        index = {c: i for i, c in enumerate(classes)}
    else:
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
    base = path.parent
    samples = [SourceSample(file, index[str(int(label)) if label.isdigit() else label],
                            _file_size(os.path.join(base, file))) for file, label in entries]
    return classes, samples


def assign_balanced(labels: Sequence[int], num_shards: int, seed: int) -> list[list[int]]:
    """Split sample positions into `num_shards` lists, class-balanced and seeded.

    Positions are shuffled, grouped by class and dealt round-robin, so shard sizes differ by
    at most one and each class's share of any two shards differs by at most one. The order
    inside a shard is shuffled again so classes are interleaved.
    """
    if num_shards < 1:
        raise DatasetError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards > len(labels):
        raise DatasetError(f"num_shards ({num_shards}) exceeds the number of samples ({len(labels)})")
    rng = random.Random(seed)
    order = list(range(len(labels)))
    rng.shuffle(order)
    order.sort(key=lambda i: labels[i])  # stable: shuffled within each class
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for j, i in enumerate(order):
        shards[j % num_shards].append(i)
    for shard in shards:
        rng.shuffle(shard)
    return shards


def encode_for_shard(data: bytes, resize_short_side: int | None = None) -> tuple[bytes, str]:
    """Return (bytes, ext) to store for one source file; raises on unreadable input.

    jpg/png/webp sources are stored as they are, after a full decode to check them. Other
    formats, and images resized to `resize_short_side`, are re-encoded as JPEG q95. With
    `resize_short_side` every output is JPEG.
    """
    img = Image.open(io.BytesIO(data))
    kept_ext = _KEEP_FORMATS.get(img.format)
    short = min(img.size)
    needs_resize = resize_short_side is not None and short > resize_short_side
    if kept_ext and not needs_resize and (resize_short_side is None or kept_ext == "jpg"):
        # A full decode to reject truncated/corrupt files; for JPEG a 1/8-scale draft still
        # entropy-decodes all the data, at a fraction of the cost.
        img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
        return data, kept_ext

    if needs_resize:
        width, height = img.size
        if width <= height:
            size = (resize_short_side, max(1, round(height * resize_short_side / width)))
        else:
            size = (max(1, round(width * resize_short_side / height)), resize_short_side)
        img.draft("RGB", size)  # JPEG only: DCT-domain downscale to >= size, much cheaper
        img = to_rgb_or_l(img).resize(size, Image.LANCZOS)
    else:
        img = to_rgb_or_l(img)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), "jpg"


def to_rgb_or_l(img: Image.Image) -> Image.Image:
    """8-bit RGB or L: palette/alpha/CMYK become RGB, 16-bit and float grayscale become L."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # PIL's convert() would clip these to 255 instead of rescaling.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        elif arr.max() > 255:
            arr = arr * (255.0 / 65535.0)
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids PIL's warning about byte-encoded palette transparency.
        img = img.convert("RGBA")
    return img.convert("RGB")


def _map(function, items: list, num_workers: int) -> list:
    if num_workers <= 1 or len(items) < 2:
        return [function(item) for item in items]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        return list(pool.map(function, items, chunksize=max(1, len(items) // (8 * num_workers))))


def convert_for_shard(data: bytes, rel_path: str, resize_short_side: int | None) -> tuple[bytes, str, str | None]:
    """(bytes, ext, note) to store for one source file; note says what was changed, if anything.

    Empty and undecodable files raise. CMYK and greyscale JPEGs are converted to RGB (other
    readers mishandle the first and expect 3 channels); a file whose content is another
    format than its name says is stored under its real format's extension.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    img = Image.open(io.BytesIO(data))
    note = None
    if img.format in ("JPEG", "MPO") and img.mode in ("CMYK", "L"):
        kind = "CMYK" if img.mode == "CMYK" else "greyscale"
        img.load()
        out = io.BytesIO()
        rgb = img.convert("RGB")
        if resize_short_side is not None and min(rgb.size) > resize_short_side:
            rgb = _resized(rgb, resize_short_side)
        rgb.save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue(), "jpg", f"{kind} JPEG converted to RGB"
    named = rel_path.rsplit(".", 1)[-1].lower()
    named_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(named)
    if named_format and img.format not in (named_format, "MPO" if named_format == "JPEG" else None):
        note = f"{img.format} data named .{named}"
    stored, ext = encode_for_shard(data, resize_short_side)
    if note:
        note += f", stored as .{ext}"
    return stored, ext, note


def _resized(img: Image.Image, short_side: int) -> Image.Image:
    width, height = img.size
    if width <= height:
        size = (short_side, max(1, round(height * short_side / width)))
    else:
        size = (max(1, round(width * short_side / height)), short_side)
    return img.resize(size, Image.LANCZOS)


def _read_source(src_root: str, sample: SourceSample) -> bytes:
    if sample.tar is None:
        with open(os.path.join(src_root, sample.rel_path), "rb") as f:
            return f.read()
    with open(sample.tar, "rb") as f:
        f.seek(sample.offset)
        data = f.read(sample.size)
    if len(data) != sample.size:
        raise OSError(f"truncated synset tar: {len(data)} of {sample.size} bytes")
    return data


class Output:
    """The destination folder: a local directory or any fsspec URL (s3://bucket/prefix, gs://...).

    Remote shards are written to a local staging file and uploaded under their final name only
    when complete (an object store makes an upload visible at once), so no reader ever sees a
    partial shard under a final name; locally the shard is renamed into place.
    """

    def __init__(self, location: str | os.PathLike):
        location = os.fspath(location)
        if location.startswith("file://"):
            location = location[len("file://"):]
        self.location = location.rstrip("/") or "/"
        self.remote = "://" in location
        if self.remote:
            from .remote import filesystem

            self.fs, self.root = filesystem(self.location)
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            Path(self.location).mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.location}/{name}" if self.remote else os.path.join(self.location, name)

    def names(self, pattern: str) -> list[str]:
        if self.remote:
            self.fs.invalidate_cache(self.root)
            found = self.fs.glob(f"{self.root}/{pattern}")
        else:
            found = glob.glob(os.path.join(glob.escape(self.location), pattern))
        return sorted(posixpath.basename(p) for p in found)

    def exists(self, name: str) -> bool:
        return self.fs.exists(f"{self.root}/{name}") if self.remote else os.path.exists(self.path(name))

    def read_text(self, name: str) -> str | None:
        if not self.exists(name):
            return None
        if self.remote:
            return self.fs.cat_file(f"{self.root}/{name}").decode()
        return Path(self.path(name)).read_text(encoding="utf-8")

    def write_text(self, name: str, text: str) -> None:
        if self.remote:
            self.fs.pipe_file(f"{self.root}/{name}", text.encode())
        else:
            _atomic_write_text(Path(self.path(name)), text)

    def remove(self, name: str) -> None:
        if self.remote:
            self.fs.rm_file(f"{self.root}/{name}")
        else:
            Path(self.path(name)).unlink(missing_ok=True)

    def publish(self, local_file: Path, name: str) -> None:
        if self.remote:
            self.fs.put_file(str(local_file), f"{self.root}/{name}")
            local_file.unlink()
        # locally, ShardWriter already renamed the shard into place


@dataclass
class _ShardTask:
    src_root: str
    out: str
    prefix: str
    shard_idx: int
    samples: list[SourceSample]
    classes: list[str]
    resize_short_side: int | None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_shard(task: _ShardTask) -> dict:
    """Write one shard; returns its record: index entry, class counts, skipped and converted files."""
    class_counts = [0] * len(task.classes)
    skipped, converted = [], []
    out = Output(task.out)
    staging = Path(tempfile.mkdtemp(prefix="make-shards-")) if out.remote else Path(task.out)
    try:
        writer = ShardWriter(staging, task.prefix, start_index=task.shard_idx)
        with writer:
            # Even a shard whose files are all unreadable is written, so numbering has no gaps.
            writer.start_shard()
            for pos, sample in enumerate(task.samples):
                try:
                    data, ext, note = convert_for_shard(_read_source(task.src_root, sample), sample.rel_path,
                                                        task.resize_short_side)
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                    skipped.append({"path": sample.rel_path, "error": f"{type(e).__name__}: {e}"})
                    continue
                if note:
                    converted.append({"path": sample.rel_path, "note": note})
                meta = {"class": task.classes[sample.cls], "path": sample.rel_path}
                writer.write(f"{task.shard_idx:06d}_{pos:06d}", data, ext, sample.cls, meta)
                class_counts[sample.cls] += 1
        (entry,) = writer.close()
        local = staging / entry["url"]
        entry["bytes"] = local.stat().st_size
        entry["sha256"] = _sha256(local)
        out.publish(local, entry["url"])
    finally:
        if out.remote:
            shutil.rmtree(staging, ignore_errors=True)
    return {"shard": entry, "class_counts": class_counts, "skipped": skipped, "converted": converted}


def _run_tasks(tasks: Iterable[_ShardTask], num_workers: int) -> Iterator[dict]:
    """Results in completion order; at most 2 * num_workers tasks in flight."""
    if num_workers <= 1:
        yield from map(_write_shard, tasks)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        pending: set[concurrent.futures.Future] = set()
        for task in tasks:
            pending.add(pool.submit(_write_shard, task))
            if len(pending) >= 2 * num_workers:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        for future in concurrent.futures.as_completed(pending):
            yield future.result()


class Progress:
    """One status line on stderr: images done, img/s, ETA (redrawn in place on a terminal)."""

    def __init__(self, total_images: int, total_shards: int, stream=None, interval_s: float | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.5 if self.tty else 30.0)
        self.total_images, self.total_shards = total_images, total_shards
        self.images = self.shards = 0
        self.start = self.last = time.monotonic()
        self.resumed_images = 0

    def update(self, images: int, final: bool = False) -> None:
        self.images += images
        self.shards += 1
        now = time.monotonic()
        if final or now - self.last >= self.interval_s:
            self.last = now
            self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty and not final else "\n"))
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.images - self.resumed_images) / elapsed
        left = self.total_images - self.images
        eta = _hms(left / rate) if rate > 0 else "?"
        return (f"make-shards: {self.shards}/{self.total_shards} shards, {self.images}/{self.total_images} images "
                f"({100 * self.images / max(1, self.total_images):.1f}%), {rate:.0f} img/s, "
                f"elapsed {_hms(elapsed)}, ETA {eta}")


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def parse_bytes(text: str | int) -> int:
    """'1GB' -> 10**9, '512MiB' -> 512 * 2**20, '1000' -> 1000."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not match:
        raise DatasetError(f"--shard-bytes {text!r}: expected a size such as 1GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), match.group(2).rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    value = int(number * scale)
    if value < 1:
        raise DatasetError(f"--shard-bytes {text!r} must be at least 1 byte")
    return value


def existing_outputs(out_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Shards and index already in the local folder `out_dir` under `prefix`."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = sorted(out_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if index_path(out_dir, prefix).exists():
        found.append(index_path(out_dir, prefix))
    return found


def _existing_names(out: "Output", prefix: str) -> list[str]:
    found = out.names(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")
    for extra in (f"{prefix}-index.json", _plan_name(prefix)):
        if out.exists(extra):
            found.append(extra)
    return found


def _plan_name(prefix: str) -> str:
    return f"{prefix}-plan.json"


def _record_name(prefix: str, shard_idx: int) -> str:
    return f"{prefix}-parts/{shard_idx:06d}.json"


SRC_FORMATS = ("folder", "synset-tars", "list")


def list_source(src: str | os.PathLike, src_format: str, num_workers: int = 1):
    """(src_root, classes, samples, problems) for one of SRC_FORMATS."""
    if src_format == "folder":
        classes, samples = list_image_folder(src)
        return os.fspath(src), classes, samples, []
    if src_format == "synset-tars":
        classes, samples, problems = list_synset_tars(src, num_workers)
        return os.fspath(src), classes, samples, problems
    if src_format == "list":
        classes, samples = list_file_list(src)
        return os.fspath(Path(src).parent), classes, samples, []
    raise DatasetError(f"--src-format {src_format!r}: use one of {', '.join(SRC_FORMATS)}")


def make_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    src_format: str = "folder",
    prefix: str = "train",
    num_shards: int | None = None,
    samples_per_shard: int = 1000,
    shard_bytes: int | str | None = None,
    seed: int = 0,
    resize_short_side: int | None = None,
    max_per_class: int | None = None,
    num_workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Convert a source (ImageFolder tree, folder of synset tars, or file list) into class-balanced
    shards; returns the index dict.

    Shard count: `num_shards`, else from `shard_bytes` (source bytes per shard), else from
    `samples_per_shard`. A re-run with the same arguments resumes: complete shards are kept,
    the others are redone. Unreadable inputs are skipped, and converted ones listed, in the
    index's report; they make their shard correspondingly smaller.
    """
    if samples_per_shard < 1:
        raise DatasetError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if resize_short_side is not None and resize_short_side < 1:
        raise DatasetError(f"resize_short_side must be >= 1, got {resize_short_side}")
    if max_per_class is not None and max_per_class < 1:
        raise DatasetError(f"max_per_class must be >= 1, got {max_per_class}")
    if not prefix or "/" in prefix:
        raise DatasetError(f"invalid shard prefix {prefix!r}")
    shard_bytes = parse_bytes(shard_bytes) if shard_bytes is not None else None

    start = time.monotonic()
    src_root, classes, samples, problems = list_source(src, src_format, num_workers)
    if not samples:
        raise DatasetError(f"no images found in {src} (--src-format {src_format})")
    if max_per_class is not None:
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        taken = [0] * len(classes)
        keep = []
        for i in order:
            if taken[samples[i].cls] < max_per_class:
                taken[samples[i].cls] += 1
                keep.append(i)
        samples = [samples[i] for i in sorted(keep)]
    if num_shards is None:
        if shard_bytes is not None:
            num_shards = max(1, -(-sum(s.size for s in samples) // shard_bytes))
        else:
            num_shards = -(-len(samples) // samples_per_shard)
    assignment = assign_balanced([s.cls for s in samples], num_shards, seed)
    logger.info("%d images in %d classes -> %d shards", len(samples), len(classes), num_shards)

    out = Output(out_dir)
    plan_digest = hashlib.sha256()
    for shard in assignment:
        for i in shard:
            plan_digest.update(f"{samples[i].rel_path}\t{samples[i].cls}\n".encode())
        plan_digest.update(b"--\n")
    plan = {"src": os.path.abspath(src) if "://" not in os.fspath(src) else os.fspath(src),
            "src_format": src_format, "prefix": prefix, "num_shards": num_shards, "seed": seed,
            "resize_short_side": resize_short_side, "samples": plan_digest.hexdigest()}
    existing = _existing_names(out, prefix)
    old_plan = out.read_text(_plan_name(prefix))
    resuming = old_plan is not None and json.loads(old_plan) == plan and not overwrite
    if existing and not resuming and not overwrite:
        raise DatasetError(
            f"{out_dir} already holds shards or an index with prefix {prefix!r} from another conversion "
            f"(e.g. {existing[0]}); pass overwrite=True / --overwrite to replace them"
        )
    records: dict[int, dict] = {}
    if resuming:
        for shard_idx in range(num_shards):
            text = out.read_text(_record_name(prefix, shard_idx))
            if text is not None and out.exists(shard_name(prefix, shard_idx)):
                records[shard_idx] = json.loads(text)
        logger.info("resuming: %d of %d shards are complete and kept", len(records), num_shards)
    else:
        for stale in existing:
            out.remove(stale)
        for stale in out.names(f"{prefix}-parts/*.json"):
            out.remove(f"{prefix}-parts/{stale}")
        out.write_text(_plan_name(prefix), json.dumps(plan, indent=1) + "\n")
    if not out.remote:  # staging files of an interrupted run
        for stale in glob.glob(os.path.join(glob.escape(out.location), f".{prefix}-*.tar.tmp-*")):
            os.unlink(stale)
        Path(out.path(f"{prefix}-parts")).mkdir(exist_ok=True)

    tasks = (
        _ShardTask(src_root, out.location, prefix, shard_idx, [samples[i] for i in positions], classes,
                   resize_short_side)
        for shard_idx, positions in enumerate(assignment)
        if shard_idx not in records
    )
    meter = Progress(len(samples), num_shards) if progress else None
    if meter is not None:
        for shard_idx in records:
            meter.images += len(assignment[shard_idx])
            meter.shards += 1
        meter.resumed_images = meter.images
    try:
        for result in _run_tasks(tasks, num_workers):
            shard_idx = int(result["shard"]["url"][len(prefix) + 1: len(prefix) + 7])
            # The record marks the shard complete for a resumed run; it is written after the shard.
            out.write_text(_record_name(prefix, shard_idx), json.dumps(result) + "\n")
            records[shard_idx] = result
            if meter is not None:
                meter.update(len(assignment[shard_idx]), final=len(records) == num_shards)
    except KeyboardInterrupt:
        raise DatasetError(f"interrupted with {len(records)} of {num_shards} shards complete; run the same "
                           f"command again to convert the rest") from None

    ordered = [records[i] for i in range(num_shards)]
    skipped = problems + [item for r in ordered for item in r["skipped"]]
    converted = [item for r in ordered for item in r.get("converted", [])]
    for item in skipped:
        logger.warning("skipped %s (%s)", item["path"], item["error"])
    class_counts = [sum(r["class_counts"][c] for r in ordered) for c in range(len(classes))]
    classes_file = f"{prefix}-classes.txt"
    out.write_text(classes_file, "".join(f"{c}\n" for c in classes))
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "prefix": prefix,
        "num_samples": sum(int(r["shard"]["num_samples"]) for r in ordered),
        "shards": [r["shard"] for r in ordered],
        "classes": list(classes),
        "classes_file": classes_file,
        "class_counts": class_counts,
        "skipped": skipped,
        "converted": converted,
        "report": {"skipped": dict(Counter(_reason(i["error"]) for i in skipped)),
                   "converted": dict(Counter(i["note"] for i in converted))},
        "source": plan["src"],
        "src_format": src_format,
        "seed": seed,
        "resize_short_side": resize_short_side,
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    out.write_text(f"{prefix}-index.json", _index_text(index))
    return index


def _reason(error: str) -> str:
    """A short category of a skip reason for the summary."""
    lowered = error.lower()
    for key, label in (("empty file", "empty file"), ("synset tar", "truncated synset tar"),
                       ("cannot identify", "not an image"), ("truncated", "truncated image"),
                       ("no such file", "missing file"), ("permission", "unreadable file")):
        if key in lowered:
            return label
    return error.split(":", 1)[0]


def make_shards_from_folder(src_root: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> dict:
    """Convert an ImageFolder tree (see `make_shards`)."""
    return make_shards(src_root, out_dir, src_format="folder", **kwargs)


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

