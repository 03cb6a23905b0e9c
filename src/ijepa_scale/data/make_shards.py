"""Write an ImageFolder tree as webdataset-compatible tar shards plus a JSON index.

Each sample is three adjacent tar members: `{key}.{jpg|png|webp}` (encoded image),
`{key}.cls` (class index, ASCII decimal) and `{key}.json` (`{"class", "path"}`).
Shards are `{prefix}-{i:06d}.tar`; the index is `{prefix}-index.json` beside them.

    python -m ijepa_scale.data.make_shards --src /data/imagenet/train --out shards/in1k \
        --samples-per-shard 1000 --resize-short-side 512 --workers 16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import logging
import multiprocessing
import os
import random
import sys
import tarfile
import time
from collections import deque
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
        "shards": [{"url": s["url"], "num_samples": int(s["num_samples"])} for s in shards],
        "classes": list(classes),
        "class_counts": None,
        "skipped": [],
    }
    index.update(extra or {})
    _atomic_write_text(path, json.dumps(index, indent=1) + "\n")
    return index


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
    rel_path: str  # POSIX path relative to the source root
    cls: int


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
                f"{rel_dir}/{fn}"
                for fn in filenames
                if not fn.startswith(".") and fn.lower().endswith(SOURCE_SUFFIXES)
            )
        if not found:
            empty.append(str(root / name))
        samples.extend(SourceSample(p, cls) for p in sorted(found))
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetError(f"{len(empty)} class directories contain no images: {shown}")
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


@dataclass
class _ShardTask:
    src_root: str
    out_dir: str
    prefix: str
    shard_idx: int
    samples: list[SourceSample]
    classes: list[str]
    resize_short_side: int | None


def _write_shard(task: _ShardTask) -> dict:
    """Write one shard; returns its index entry plus class counts and skipped files."""
    class_counts = [0] * len(task.classes)
    skipped = []
    writer = ShardWriter(task.out_dir, task.prefix, start_index=task.shard_idx)
    with writer:
        # Even a shard whose files are all unreadable is written, so numbering has no gaps.
        writer.start_shard()
        for pos, sample in enumerate(task.samples):
            try:
                with open(os.path.join(task.src_root, sample.rel_path), "rb") as f:
                    raw = f.read()
                data, ext = encode_for_shard(raw, task.resize_short_side)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                skipped.append({"path": sample.rel_path, "error": f"{type(e).__name__}: {e}"})
                continue
            meta = {"class": task.classes[sample.cls], "path": sample.rel_path}
            writer.write(f"{task.shard_idx:06d}_{pos:06d}", data, ext, sample.cls, meta)
            class_counts[sample.cls] += 1
    (entry,) = writer.close()
    return {"shard": entry, "class_counts": class_counts, "skipped": skipped}


def _run_tasks(tasks: Iterable[_ShardTask], num_workers: int) -> Iterator[dict]:
    """Results in task order; at most 2 * num_workers tasks in flight."""
    if num_workers <= 1:
        yield from map(_write_shard, tasks)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        pending: deque[concurrent.futures.Future] = deque()
        for task in tasks:
            pending.append(pool.submit(_write_shard, task))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def existing_outputs(out_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Shards and index already in `out_dir` under `prefix`."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = sorted(out_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if index_path(out_dir, prefix).exists():
        found.append(index_path(out_dir, prefix))
    return found


def make_shards_from_folder(
    src_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    prefix: str = "train",
    num_shards: int | None = None,
    samples_per_shard: int = 1000,
    seed: int = 0,
    resize_short_side: int | None = None,
    max_per_class: int | None = None,
    num_workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Convert an ImageFolder tree into class-balanced shards; returns the index dict.

    `num_shards` takes precedence over `samples_per_shard`. Only the list of paths is held
    in memory; images are streamed shard by shard (in `num_workers` processes). Unreadable
    files are skipped and listed in the index under "skipped"; they make their shard
    correspondingly smaller.
    """
    out = Path(out_dir)
    if samples_per_shard < 1:
        raise DatasetError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if resize_short_side is not None and resize_short_side < 1:
        raise DatasetError(f"resize_short_side must be >= 1, got {resize_short_side}")
    if max_per_class is not None and max_per_class < 1:
        raise DatasetError(f"max_per_class must be >= 1, got {max_per_class}")
    existing = existing_outputs(out, prefix)
    if existing and not overwrite:
        raise DatasetError(
            f"{out} already holds shards or an index with prefix {prefix!r} "
            f"(e.g. {existing[0].name}); pass overwrite=True / --overwrite to replace them"
        )

    start = time.monotonic()
    classes, samples = list_image_folder(src_root)
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
        num_shards = -(-len(samples) // samples_per_shard)
    assignment = assign_balanced([s.cls for s in samples], num_shards, seed)
    logger.info("%d images in %d classes -> %d shards", len(samples), len(classes), num_shards)

    for stale in existing:  # only reached with overwrite=True
        stale.unlink()
    tasks = (
        _ShardTask(
            os.fspath(src_root), os.fspath(out), prefix, shard_idx,
            [samples[i] for i in positions], classes, resize_short_side,
        )
        for shard_idx, positions in enumerate(assignment)
    )
    shards, skipped = [], []
    class_counts = [0] * len(classes)
    for result in _run_tasks(tasks, num_workers):
        shards.append(result["shard"])
        skipped.extend(result["skipped"])
        class_counts = [a + b for a, b in zip(class_counts, result["class_counts"])]
        if len(shards) % 100 == 0:
            logger.info("%d/%d shards written", len(shards), num_shards)
    for item in skipped:
        logger.warning("skipped unreadable file %s (%s)", item["path"], item["error"])

    return write_index(
        index_path(out, prefix),
        shards,
        classes,
        extra={
            "prefix": prefix,
            "class_counts": class_counts,
            "skipped": skipped,
            "source": os.path.abspath(src_root),
            "seed": seed,
            "resize_short_side": resize_short_side,
            "elapsed_s": round(time.monotonic() - start, 3),
        },
    )


def summary_line(index: dict, out_dir: str | os.PathLike) -> str:
    sizes = [s["num_samples"] for s in index["shards"]]
    return (
        f"wrote {index['num_samples']} samples ({len(index['classes'])} classes) to "
        f"{len(sizes)} shards of {min(sizes)}-{max(sizes)} samples in {out_dir} "
        f"(index {index['prefix']}-index.json); skipped {len(index['skipped'])} unreadable files"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ijepa-scale make-shards",
        description="Convert an ImageFolder tree (src/<class>/**/*.jpg) into tar shards.",
    )
    parser.add_argument("--src", required=True, help="ImageFolder root")
    parser.add_argument("--out", required=True, help="output directory for shards and index")
    parser.add_argument("--prefix", default="train")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--num-shards", type=int, default=None)
    size.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--resize-short-side", type=int, default=None,
                        help="downscale images whose short side is larger (re-encoded JPEG q95)")
    parser.add_argument("--max-per-class", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing shards/index with the same prefix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        index = make_shards_from_folder(
            args.src, args.out, prefix=args.prefix, num_shards=args.num_shards,
            samples_per_shard=args.samples_per_shard, seed=args.seed,
            resize_short_side=args.resize_short_side, max_per_class=args.max_per_class,
            num_workers=args.workers, overwrite=args.overwrite,
        )
    except DatasetError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(summary_line(index, args.out))


if __name__ == "__main__":
    # Run through the importable module so worker processes unpickle tasks by its real name.
    from ijepa_scale.data.make_shards import main as _main

    _main(sys.argv[1:])
