"""Throughput of the training input pipeline (tar read, decode, crop, collation, masks, workers).

    ijepa-scale bench-data --shards 's3://bucket/in1k/train-{000000..001023}.tar' --workers 0 2 4
    ijepa-scale bench-data --make-photo-shards /tmp/bench_shards --workers 0 1 2

Each worker count builds the same `DataStream` the trainer builds (ImageTransform with the
default recipe, official in1k multi-block masks) and times whole batches as the training loop
would get them. Two per-core numbers come with each row: images per CPU-second of decode +
transform alone, in this process on the rank's first samples, and images per CPU-second of the
whole stream (this process plus its loader workers). `--make-photo-shards` first writes shards
of ImageNet-like 500x375 JPEGs cut from the real photos bundled with scikit-image and
scikit-learn.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import resource
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ijepa_scale.benchmarks.masks import OFFICIAL_IN1K_MASK
from ijepa_scale.data.shard_format import ShardWriter, index_path, shard_name, write_index
from ijepa_scale.data.sources import RawSample, open_shards
from ijepa_scale.data.stream import DataStream
from ijepa_scale.data.transforms import ImageTransform, open_image, sample_crop_box, to_rgb
from ijepa_scale.masks import MultiBlockMaskCollator

# Real photos bundled with scikit-image (stereo_motorcycle: left view) and scikit-learn.
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "stereo_motorcycle",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
PHOTO_SIZE = (500, 375)  # ImageNet's most common size
PHOTO_QUALITY = 90
PHOTO_PREFIX = "train"


class MissingDependencyError(RuntimeError):
    pass


def load_photos() -> dict[str, np.ndarray]:
    """The bundled photos as uint8 HxWx3 arrays, by name."""
    try:
        from skimage import data as skdata
    except ImportError as e:
        raise MissingDependencyError(
            "--make-photo-shards needs scikit-image (and scikit-learn): pip install -e .[dev]"
        ) from e
    try:
        from sklearn.datasets import load_sample_image
    except ImportError as e:
        raise MissingDependencyError(
            "--make-photo-shards needs scikit-learn (and scikit-image): pip install -e .[dev]"
        ) from e
    photos = {}
    for name in SKIMAGE_PHOTOS:
        image = getattr(skdata, name)()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
            image = image[0]
        photos[name] = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    for name in SKLEARN_PHOTOS:
        photos[name.rsplit(".", 1)[0]] = np.ascontiguousarray(load_sample_image(name), dtype=np.uint8)
    return photos


def _photo_crop(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random 4:3 crop (35-100 % of the area of the largest 4:3 box), maybe flipped, at 500x375."""
    width, height = photo.size
    if width * 3 >= height * 4:
        box_h, box_w = height, height * 4 / 3
    else:
        box_w, box_h = width, width * 3 / 4
    side = math.sqrt(rng.uniform(0.35, 1.0))
    w, h = box_w * side, box_h * side
    left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
    image = photo.resize(PHOTO_SIZE, Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def photo_shard_pattern(out_dir: str | os.PathLike, num_shards: int) -> str:
    """Brace pattern of the shards written by `write_photo_shards` (names as `shard_name`)."""
    if num_shards == 1:
        return str(Path(out_dir) / shard_name(PHOTO_PREFIX, 0))
    return str(Path(out_dir) / f"{PHOTO_PREFIX}-{{{0:06d}..{num_shards - 1:06d}}}.tar")


def write_photo_shards(
    out_dir: str | os.PathLike,
    num_images: int = 2000,
    num_shards: int = 8,
    seed: int = 0,
    quality: int = PHOTO_QUALITY,
    reuse: bool = True,
) -> str:
    """Write `num_images` 500x375 JPEG crops of the bundled photos in `num_shards` shards + index.

    Returns the shard pattern for `open_shards`. With `reuse`, shards already written with the
    same settings are kept.
    """
    if num_images < 1 or not 1 <= num_shards <= num_images:
        raise ValueError(f"need num_images >= num_shards >= 1, got {num_images} images, {num_shards} shards")
    out_dir = Path(out_dir)
    pattern = photo_shard_pattern(out_dir, num_shards)
    settings = {"num_images": num_images, "num_shards": num_shards, "seed": seed, "quality": quality,
                "size": list(PHOTO_SIZE)}
    index_file = index_path(out_dir, PHOTO_PREFIX)
    if reuse and index_file.exists():
        try:
            old = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("photo_shards") == settings and all(
            (out_dir / s["url"]).exists() for s in old.get("shards", [])
        ):
            print(f"reusing {num_images} photo samples in {num_shards} shards: {pattern}", flush=True)
            return pattern

    photos = load_photos()
    names = list(photos)
    pil_photos = [Image.fromarray(photos[n], "RGB") for n in names]
    rng = random.Random(seed)
    start = time.perf_counter()
    with ShardWriter(out_dir, prefix=PHOTO_PREFIX) as writer:
        for shard in range(num_shards):
            for i in range(shard * num_images // num_shards, (shard + 1) * num_images // num_shards):
                label = rng.randrange(len(names))
                buf = io.BytesIO()
                _photo_crop(pil_photos[label], rng).save(buf, format="JPEG", quality=quality)
                writer.write(f"{i:08d}", buf.getvalue(), "jpg", label, meta={"class": names[label]})
            writer.next_shard()
        shards = writer.close()
    write_index(index_file, shards, names, extra={"photo_shards": settings})
    total = sum((out_dir / s["url"]).stat().st_size for s in shards)
    print(
        f"wrote {num_images} photo samples (500x375 JPEG q{quality}, {len(names)} photos) in {num_shards} shards, "
        f"{total / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s: {pattern}",
        flush=True,
    )
    return pattern


def _build_stream(source, *, workers, batch_size, crop_size, patch_size, world_size, rank, seed, shuffle_buffer):
    """The trainer's construction with the default data config and the official in1k masks."""
    collator = MultiBlockMaskCollator(
        input_size=crop_size, patch_size=patch_size, seed=seed, rank=rank, **OFFICIAL_IN1K_MASK
    )
    transform = ImageTransform(crop_size=crop_size, crop_scale=(0.3, 1.0))
    return DataStream(
        source, transform, collator, batch_size=batch_size, num_workers=workers, rank=rank,
        world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer, on_error="skip", pin_memory=False,
    )


def _process_tree_cpu_seconds() -> Optional[float]:
    """CPU seconds used so far by this process and its children (the loader workers).

    Live children are read from /proc (Linux; None where it is not available); children that
    have exited and been joined are in RUSAGE_CHILDREN.
    """
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    try:
        children = []
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                children.extend(f.read().split())
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in children:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def measure_decode_per_core(stream: DataStream, num_images: int) -> dict:
    """Images per CPU-second (this thread) for tar read, and for decode + transform, in this process.

    The samples are the first `num_images` positions of the rank's slice of epoch 0, each
    transformed with the rng the stream uses for that position.
    """
    plan = stream.plan
    start = plan.rank_start(stream.rank)
    stop = start + min(num_images, plan.steps_per_epoch * plan.batch_size)
    t0 = time.thread_time()
    items = list(stream.source.read_range(stream.seed, 0, start, stop))
    read_cpu = time.thread_time() - t0
    samples = [(start + i, item) for i, item in enumerate(items) if isinstance(item, RawSample)]
    if not samples:
        raise RuntimeError(f"no readable sample in positions {start}..{stop} of epoch 0")
    t0 = time.thread_time()
    for position, item in samples:
        rng = random.Random(f"{stream.seed}/0/{position}")
        stream.transform(open_image(item.data), rng)
    decode_cpu = time.thread_time() - t0
    split = _stage_split(stream, samples)
    return {
        "images": len(samples),
        "mean_kb": statistics.fmean(len(item.data) for _, item in samples) / 1000,
        "read_img_per_cpu_s": len(items) / max(read_cpu, 1e-9),
        "decode_transform_img_per_cpu_s": len(samples) / max(decode_cpu, 1e-9),
        "stage_ms": {"read": read_cpu * 1e3 / len(items), **split},
        "bare_pil_rrc_img_per_cpu_s": bare_decode_rrc(samples, stream.transform),
    }


def _stage_split(stream: DataStream, samples) -> dict:
    """CPU ms per image of each stage of the stream's transform: decode (at the drafted size),
    crop (resize to the output + tensor), and collate (stack a batch + sample its masks)."""
    transform = stream.transform
    decode = crop = 0.0
    tensors = []
    for position, item in samples:
        rng = random.Random(f"{stream.seed}/0/{position}")
        t0 = time.thread_time()
        img = open_image(item.data)
        box = sample_crop_box(img.width, img.height, transform.crop_scale, transform.ratio, rng)
        img, resize_box = transform._decode(img, box)
        t1 = time.thread_time()
        img = img.resize((transform.crop_size, transform.crop_size), Image.BILINEAR, box=resize_box)
        if img.mode != "RGB":
            img = to_rgb(img)
        tensors.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous())
        t2 = time.thread_time()
        decode, crop = decode + t1 - t0, crop + t2 - t1
    batch_size = stream.plan.batch_size
    t0 = time.thread_time()
    batches = 0
    for start in range(0, len(tensors) - batch_size + 1, batch_size):
        torch.stack(tensors[start:start + batch_size])
        stream.collator.sample(batch_size, step=batches, rank=stream.rank)
        batches += 1
    collate = time.thread_time() - t0
    n = len(samples)
    return {"decode": decode * 1e3 / n, "crop": crop * 1e3 / n,
            "collate": collate * 1e3 / max(1, batches * batch_size)}


def bare_decode_rrc(samples, transform: ImageTransform) -> float:
    """Images per CPU-second of the plain loop the loader is measured against: PIL full decode
    to RGB, RandomResizedCrop (same box sampler) to the output size, uint8 tensor."""
    size = transform.crop_size
    rng = random.Random(0)
    t0 = time.thread_time()
    for _, item in samples:
        img = Image.open(io.BytesIO(item.data)).convert("RGB")
        box = sample_crop_box(img.width, img.height, transform.crop_scale, transform.ratio, rng)
        img = img.resize((size, size), Image.BILINEAR, box=(box.left, box.top, box.left + box.width,
                                                             box.top + box.height))
        torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    return len(samples) / max(time.thread_time() - t0, 1e-9)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure_rss_over_epochs(source, num_workers: int, epochs: int, *, batch_size, crop_size, patch_size,
                            world_size, rank, seed, shuffle_buffer, log=print) -> list[dict]:
    """RSS of this process and of its loader workers at the end of each of `epochs` full epochs
    (Linux /proc); flat numbers mean nothing leaks per epoch (streams, sockets, workers)."""
    stream = _build_stream(
        source, workers=num_workers, batch_size=batch_size, crop_size=crop_size, patch_size=patch_size,
        world_size=world_size, rank=rank, seed=seed, shuffle_buffer=shuffle_buffer,
    )
    rows = []
    try:
        for epoch in range(epochs):
            start = time.perf_counter()
            images = sum(batch["images"].shape[0] for batch in stream.epoch_batches())
            wall = time.perf_counter() - start
            loader = stream._loader
            workers = [w.pid for w in loader._iterator._workers] if loader is not None and loader._iterator is not None else []
            row = {"epoch": epoch + 1, "img_per_s": images / wall, "main_rss_mb": _rss_mb(os.getpid()),
                   "workers_rss_mb": sum(_rss_mb(pid) for pid in workers), "worker_pids": len(workers)}
            rows.append(row)
            log(f"epoch {epoch + 1}: {row['img_per_s']:.0f} img/s, RSS main {row['main_rss_mb']:.0f} MB, "
                f"{len(workers)} workers {row['workers_rss_mb']:.0f} MB")
    finally:
        stream.close()
    return rows


def benchmark_stream(
    pattern: str,
    workers: Sequence[int] = (0, 1, 2),
    *,
    batch_size: int = 64,
    crop_size: int = 224,
    patch_size: int = 14,
    batches: int = 20,
    warmup: Optional[int] = None,
    world_size: int = 1,
    rank: int = 0,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    index_url: Optional[str] = None,
    per_core_images: int = 512,
    threads: Optional[int] = 1,
    rss_epochs: int = 0,
    log=print,
) -> dict:
    """Time the rank's DataStream for each worker count; return a JSON-serialisable summary.

    `warmup` batches (default: max(2, workers)) are taken before the clock starts; they hold the
    loader start-up and the first shuffle-block fill, reported as `first_batch_s`. If the
    epoch is too short, the measurement runs into the next epoch (loader restart included,
    as in training) and `epoch_restarts` counts it.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world size {world_size}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        source = open_shards(pattern, index_url)
        summary = {
            "benchmark": "data_pipeline",
            "shards": pattern,
            "num_shards": len(source.urls),
            "num_samples": source.num_samples,
            "batch_size": batch_size,
            "crop_size": crop_size,
            "patch_size": patch_size,
            "world_size": world_size,
            "rank": rank,
            "shuffle_buffer": shuffle_buffer,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1m_start": round(os.getloadavg()[0], 2),
            "results": [],
        }
        for num_workers in workers:
            row = _run_one(
                source, num_workers, batch_size=batch_size, crop_size=crop_size, patch_size=patch_size,
                batches=batches, warmup=max(2, num_workers) if warmup is None else warmup,
                world_size=world_size, rank=rank, seed=seed, shuffle_buffer=shuffle_buffer,
                per_core_images=per_core_images,
            )
            summary["mean_jpeg_kb"] = row.pop("mean_kb")
            summary["results"].append(row)
            log(
                f"workers={num_workers}: {row['img_per_s']:.0f} img/s, first batch {row['first_batch_s']:.2f} s, "
                f"decode+transform {row['decode_transform_img_per_cpu_s']:.0f} img/CPU-s, bare PIL decode+RRC "
                f"{row['bare_pil_rrc_img_per_cpu_s']:.0f} img/CPU-s"
            )
        if rss_epochs > 0:
            summary["rss"] = measure_rss_over_epochs(
                source, max(workers), rss_epochs, batch_size=batch_size, crop_size=crop_size,
                patch_size=patch_size, world_size=world_size, rank=rank, seed=seed,
                shuffle_buffer=shuffle_buffer, log=log)
        summary["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
        return summary
    finally:
        torch.set_num_threads(previous_threads)


def _run_one(source, num_workers, *, batch_size, crop_size, patch_size, batches, warmup, world_size, rank,
             seed, shuffle_buffer, per_core_images) -> dict:
    stream = _build_stream(
        source, workers=num_workers, batch_size=batch_size, crop_size=crop_size, patch_size=patch_size,
        world_size=world_size, rank=rank, seed=seed, shuffle_buffer=shuffle_buffer,
    )
    total = warmup + batches
    arrivals: list[float] = []
    errors = 0
    epoch_restarts = 0
    shape = None
    cpu_begin = cpu_end = None
    start = time.perf_counter()
    if warmup == 0:
        cpu_begin = _process_tree_cpu_seconds()
    while len(arrivals) < total:
        if arrivals:
            epoch_restarts += 1
        batches_iter = stream.epoch_batches()
        try:
            for batch in batches_iter:
                arrivals.append(time.perf_counter())
                if len(arrivals) == warmup:
                    cpu_begin = _process_tree_cpu_seconds()
                elif len(arrivals) == total:
                    cpu_end = _process_tree_cpu_seconds()
                errors += len(batch["errors"])
                if shape is None:
                    shape = (tuple(batch["images"].shape), str(batch["images"].dtype),
                             tuple(batch["masks_enc"][0].shape), tuple(batch["masks_pred"][0].shape))
                if len(arrivals) >= total:
                    break
        finally:
            batches_iter.close()
    stream.close()  # the loader workers persist across epochs otherwise
    wall = time.perf_counter() - start

    window = arrivals[warmup:]
    t_begin = arrivals[warmup - 1] if warmup > 0 else start
    window_wall = window[-1] - t_begin
    # CPU of this process and the workers while the measured batches were produced; workers
    # run ahead by up to prefetch_factor batches each, about as much at both ends of the window.
    window_cpu = cpu_end - cpu_begin if cpu_begin is not None and cpu_end is not None else None
    measured = len(window)
    steps = [b - a for a, b in zip([t_begin] + window[:-1], window)]
    per_core = measure_decode_per_core(stream, per_core_images)
    return {
        "workers": num_workers,
        "img_per_s": measured * batch_size / window_wall,
        "first_batch_s": arrivals[0] - start,
        "batch_ms_p50": statistics.median(steps) * 1e3,
        "batch_ms_max": max(steps) * 1e3,
        "pipeline_img_per_cpu_s": measured * batch_size / window_cpu if window_cpu else None,
        "cpu_busy": window_cpu / window_wall if window_cpu is not None else None,
        "decode_transform_img_per_cpu_s": per_core["decode_transform_img_per_cpu_s"],
        "read_img_per_cpu_s": per_core["read_img_per_cpu_s"],
        "bare_pil_rrc_img_per_cpu_s": per_core["bare_pil_rrc_img_per_cpu_s"],
        "stage_ms": per_core["stage_ms"],
        "warmup_batches": warmup,
        "measured_batches": measured,
        "steps_per_epoch": stream.steps_per_epoch,
        "epoch_restarts": epoch_restarts,
        "bad_samples": errors,
        "wall_s": wall,
        "mean_kb": per_core["mean_kb"],
        "batch_shapes": {"images": shape[0], "dtype": shape[1], "masks_enc": shape[2], "masks_pred": shape[3]},
    }


def _num(value, fmt=".0f") -> str:
    return "n/a" if value is None else format(value, fmt)


def format_table(summary: dict) -> str:
    header = (
        f"{'workers':>7} | {'img/s':>6} | {'1st batch s':>11} | {'batch ms p50/max':>16} | "
        f"{'pipeline img/CPU-s':>18} | {'CPU busy':>8} | {'decode+RRC img/CPU-s':>20} | "
        f"{'bare PIL limit':>14} | {'pipeline/limit':>14} | {'ms/img read/decode/crop/collate':>31}"
    )
    lines = [header, "-" * len(header)]
    for r in summary["results"]:
        ms = r["stage_ms"]
        ratio = r["pipeline_img_per_cpu_s"] / r["bare_pil_rrc_img_per_cpu_s"] if r["pipeline_img_per_cpu_s"] else None
        lines.append(
            f"{r['workers']:>7} | {r['img_per_s']:>6.0f} | {r['first_batch_s']:>11.2f} | "
            f"{r['batch_ms_p50']:>7.0f} / {r['batch_ms_max']:<6.0f} | {_num(r['pipeline_img_per_cpu_s']):>18} | "
            f"{_num(r['cpu_busy'], '.2f'):>8} | "
            f"{r['decode_transform_img_per_cpu_s']:>20.0f} | {r['bare_pil_rrc_img_per_cpu_s']:>14.0f} | "
            f"{_num(ratio, '.0%'):>14} | "
            f"{ms['read']:.3f} / {ms['decode']:.3f} / {ms['crop']:.3f} / {ms['collate']:.3f}".rjust(31)
        )
    for r in summary.get("rss", []):
        lines.append(f"RSS after epoch {r['epoch']}: main {r['main_rss_mb']:.0f} MB, {r['worker_pids']} workers "
                     f"{r['workers_rss_mb']:.0f} MB ({r['img_per_s']:.0f} img/s)")
    return "\n".join(lines)


def round_floats(value, digits=2):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value

