"""Frozen-encoder features over tar shards, split over ranks and gathered.

No augmentation: each image is centre-cropped to its largest square and resized (bilinear) to
the crop size, then normalised on the device as in training. Each rank reads a contiguous part
of the source (sizes differ by at most one sample), so every sample is read exactly once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..distributed import env as dist_utils
from ..data.sources import RawSample
from ..data.transforms import normalize, open_image, to_rgb

logger = logging.getLogger("ijepa_scale")

POOLS = ("mean", "last4")


@dataclass
class FeatureSet:
    features: torch.Tensor  # [N, D] float32, CPU
    labels: torch.Tensor  # [N] int64
    skipped: int  # unreadable samples left out


def eval_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded image -> uint8 [3, size, size]: centre square, resized; no randomness."""
    img = open_image(data)
    side = min(img.width, img.height)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    img.draft("RGB", (max(size, img.width * size // side), max(size, img.height * size // side)))
    scale = img.width / (2 * left + side)  # draft may have reduced the decoded size
    box = tuple(c * scale for c in (left, top, left + side, top + side))
    img = to_rgb(img).resize((size, size), Image.BILINEAR, box=box)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


class _SliceDataset(IterableDataset):
    """Batches (images uint8, labels, errors) of positions [start, stop) of a source, split over workers."""

    def __init__(self, source, start: int, stop: int, batch_size: int, size: int):
        self.source, self.start, self.stop, self.batch_size, self.size = source, start, stop, batch_size, size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        count = self.stop - self.start
        lo = self.start + count * worker // workers
        hi = self.start + count * (worker + 1) // workers
        images, labels, errors = [], [], []
        # Epoch 0 of seed 0 fixes the shard order; any order works since labels travel with features.
        for item in self.source.read_range(0, 0, lo, hi):
            image = None
            if isinstance(item, RawSample):
                try:
                    image = eval_image(item.data, self.size)
                except Exception as exc:
                    errors.append(f"{item.source}: cannot decode {item.key!r}: {type(exc).__name__}: {exc}")
            else:
                errors.append(f"{item.source}: {item.message}")
            if image is not None:
                images.append(image)
                labels.append(item.label)
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long), errors
                images, labels, errors = [], [], []
        if images or errors:
            empty = torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
            yield (torch.stack(images) if images else empty), torch.tensor(labels, dtype=torch.long), errors


@torch.no_grad()
def pooled_features(encoder: torch.nn.Module, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """`mean`: average of the last layer's tokens; `last4`: the average-pooled outputs of the last
    4 blocks (before the final norm), concatenated."""
    if pool == "mean":
        out = encoder(images)
        return out.mean(dim=1) if out.ndim == 3 else out  # a convolutional encoder gives [B, C] already
    if pool != "last4":
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if not hasattr(encoder, "blocks"):
        raise ValueError("pool=last4 needs a ViT encoder (the energy transformer has one shared block, a ConvNeXt "
                         "none); use --pool mean")
    blocks = list(encoder.blocks)
    if len(blocks) < 4:
        raise ValueError(f"pool=last4 needs an encoder with at least 4 blocks, this one has {len(blocks)}")
    outputs = []
    hooks = [b.register_forward_hook(lambda module, args, out: outputs.append(out.mean(dim=1))) for b in blocks[-4:]]
    try:
        encoder(images)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(outputs, dim=1)


class Progress:
    """Rank 0's progress line for a known total: count, rate and ETA, at most every `every_s` seconds.
    `total` may grow while it runs; `unit` names what is counted."""

    def __init__(self, desc: str, total: float, every_s: float = 5.0, enabled: bool = True, unit: str = "img"):
        self.desc, self.total, self.every_s, self.enabled, self.unit = desc, total, every_s, enabled, unit
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, done: float, note: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or done >= self.total):
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else math.inf
            share = f"{100.0 * done / max(1, self.total):.0f}%"
            if self.unit == "%":  # the count is the share
                count = share
            else:
                count = f"{done}/{self.total}" if isinstance(done, int) else f"{done:.1f}/{self.total:g}"
                count += f" ({share})"
            speed = f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"
            logger.info("%s: %s %s %s/s, ETA %.0f s%s", self.desc, count, speed, self.unit, eta,
                        f" ({note})" if note else "")


RAW_PIXELS = None  # in extract_feature_sets: the images themselves (uint8, flattened), see raw_pixel_features


def extract_features(encoder: torch.nn.Module, source, *, crop_size: int, pool: str = "mean", batch_size: int = 256,
                     num_workers: int = 0, device: torch.device = torch.device("cpu"), rank: int = 0,
                     world_size: int = 1, desc: str = "features", gather: bool = True,
                     progress_every_s: float = 5.0) -> FeatureSet:
    """Features of this rank's part of `source` (or of the whole source on every rank if `gather`)."""
    return extract_feature_sets({"": encoder}, source, crop_size=crop_size, pool=pool, batch_size=batch_size,
                                num_workers=num_workers, device=device, rank=rank, world_size=world_size, desc=desc,
                                gather=gather, progress_every_s=progress_every_s)[""]


def extract_feature_sets(encoders: dict, source, *, crop_size: int, pool: str = "mean", batch_size: int = 256,
                         num_workers: int = 0, device: torch.device = torch.device("cpu"), rank: int = 0,
                         world_size: int = 1, desc: str = "features", gather: bool = True,
                         progress_every_s: float = 5.0) -> dict[str, FeatureSet]:
    """{name: features} of every encoder in `encoders` ({name: module, or RAW_PIXELS}), from one read of
    this rank's part of `source` (or of the whole source on every rank if `gather`)."""
    start, stop = rank_range(source.num_samples, rank, world_size)
    loader = DataLoader(
        _SliceDataset(source, start, stop, batch_size, crop_size), batch_size=None, num_workers=num_workers,
        # Its own generator: iterating a DataLoader otherwise draws from the global torch RNG,
        # which would change a training run that evaluates periodically.
        generator=torch.Generator().manual_seed(0),
        multiprocessing_context="fork" if num_workers > 0 else None,
    )
    progress = Progress(desc, source.num_samples, progress_every_s, enabled=rank == 0)
    modules = {name: m for name, m in encoders.items() if m is not RAW_PIXELS}
    was_training = {name: m.training for name, m in modules.items()}
    for m in modules.values():
        m.eval()
    features = {name: [] for name in encoders}
    labels, skipped = [], 0
    seen = 0
    try:
        for images, batch_labels, errors in loader:
            for message in errors[:1]:
                logger.warning("%s: skipped %d unreadable sample(s), e.g. %s", desc, len(errors), message)
            skipped += len(errors)
            seen += len(images) + len(errors)
            if len(images):
                x = normalize(images.to(device)) if modules else None
                for name, encoder in encoders.items():
                    out = images.flatten(1) if encoder is RAW_PIXELS else pooled_features(encoder, x, pool).float()
                    features[name].append(out.cpu())
                labels.append(batch_labels)
            progress.update(min(source.num_samples, seen * world_size))
    finally:
        for name, m in modules.items():
            m.train(was_training[name])
    all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    result = {}
    for name in encoders:
        local = FeatureSet(torch.cat(features[name]) if features[name] else torch.zeros(0, 0), all_labels, skipped)
        result[name] = gather_features(local) if gather else local
    if progress.done < source.num_samples:  # rank 0's estimate fell short: say when this rank is done
        progress.update(source.num_samples)
    return result


def raw_pixel_features(train: FeatureSet, val: FeatureSet, crop_size: int) -> tuple[FeatureSet, FeatureSet]:
    """RAW_PIXELS sets -> the normalised input the encoders see, flattened, as float32. When every image
    of both sets is grey (three equal channels, on every rank) only the first channel is kept: the other
    two are affine copies of it and would only make the probe slower."""
    def channels(fs):
        return fs.features.view(len(fs.features), 3, crop_size, crop_size)

    grey = all(dist_utils.all_gather_objects(all(
        bool((channels(fs)[:, 0] == channels(fs)[:, 1]).all() and (channels(fs)[:, 0] == channels(fs)[:, 2]).all())
        for fs in (train, val) if len(fs.features))))
    out = []
    for fs in (train, val):
        if len(fs.features) == 0:
            width = (1 if grey else 3) * crop_size * crop_size
            out.append(FeatureSet(torch.zeros(0, width), fs.labels, fs.skipped))
            continue
        parts = []
        for chunk in channels(fs).split(8192):  # bounds the float copy of all three channels
            x = normalize(chunk)
            parts.append((x[:, :1] if grey else x).flatten(1))
        out.append(FeatureSet(torch.cat(parts), fs.labels, fs.skipped))
    return out[0], out[1]


def gather_features(local: FeatureSet) -> FeatureSet:
    """Every rank's features, concatenated in rank order, on every rank."""
    parts = dist_utils.all_gather_objects((local.features, local.labels, local.skipped))
    width = max(f.shape[1] for f, _, _ in parts)
    dtype = next((f.dtype for f, _, _ in parts if len(f)), torch.float32)
    return FeatureSet(
        torch.cat([f if len(f) else torch.zeros(0, width, dtype=dtype) for f, _, _ in parts]),
        torch.cat([y for _, y, _ in parts]),
        sum(s for _, _, s in parts),
    )
