"""Conversion of a source into class-balanced shards and their index, resumable, to a local folder or any
fsspec URL. A re-run with the same arguments keeps the complete shards (`{prefix}-plan.json` and the
per-shard records in `{prefix}-parts/` tell which) and redoes the others.

    ijepa-scale make-shards --src /data/imagenet/train --out shards/in1k \
        --samples-per-shard 1000 --resize-short-side 512 --workers 16
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import posixpath
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from PIL import Image

from ..fileutil import atomic_write
from .image_encoding import convert_for_shard
from .image_sources import SourceSample, list_source, read_source
from .shard_format import INDEX_FORMAT, INDEX_VERSION, DatasetError, ShardWriter, index_text, shard_name

logger = logging.getLogger(__name__)

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
            atomic_write(self.path(name), lambda f: f.write(text.encode()))

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
                    data, ext, note = convert_for_shard(read_source(task.src_root, sample), sample.rel_path,
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
    out.write_text(f"{prefix}-index.json", index_text(index))
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
