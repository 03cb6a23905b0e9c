"""Fashion-MNIST (Debian package `dataset-fashion-mnist`) -> tar shards in the project format.

    ijepa-scale fashion-mnist --out data/fmnist --split train --num-shards 8

Samples are 28x28 grayscale PNGs; shards are `fmnist-{split}-{i:06d}.tar` with the index
`fmnist-{split}-index.json`.
"""

from __future__ import annotations

import gzip
import io
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from .convert import assign_balanced
from .shard_format import DatasetError, ShardWriter, existing_outputs, index_path, write_index

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def load_idx(images_gz: str | os.PathLike, labels_gz: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read gzipped IDX files: images uint8 [N, rows, cols], labels uint8 [N]."""
    with gzip.open(images_gz, "rb") as f:
        raw = f.read()
    magic, count, rows, cols = np.frombuffer(raw, dtype=">u4", count=4)
    if magic != _IMAGES_MAGIC or len(raw) != 16 + count * rows * cols:
        raise DatasetError(f"not an IDX3 uint8 image file (magic {magic}): {images_gz}")
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)

    with gzip.open(labels_gz, "rb") as f:
        raw = f.read()
    magic, label_count = np.frombuffer(raw, dtype=">u4", count=2)
    if magic != _LABELS_MAGIC or len(raw) != 8 + label_count:
        raise DatasetError(f"not an IDX1 uint8 label file (magic {magic}): {labels_gz}")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if label_count != count:
        raise DatasetError(f"{images_gz} has {count} images but {labels_gz} has {label_count} labels")
    return images, labels


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted positions of the first `per_class` samples of each class after a seeded shuffle."""
    if per_class < 1:
        raise DatasetError(f"per_class must be >= 1, got {per_class}")
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        c = int(labels[i])
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            keep.append(i)
    short = {c: n for c, n in taken.items() if n < per_class}
    if short:
        raise DatasetError(f"per_class={per_class} exceeds the available samples of classes {short}")
    return np.array(sorted(keep), dtype=np.int64)


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, "PNG")
    return buf.getvalue()


def make_fashion_mnist_shards(
    out_dir: str | os.PathLike,
    split: str = "train",
    num_shards: int = 8,
    per_class: int | None = None,
    seed: int = 0,
    source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR,
) -> dict:
    """Write `{out_dir}/fmnist-{split}-{i:06d}.tar` and the index; return the index dict."""
    if split not in SPLIT_FILES:
        raise DatasetError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    source = Path(source_dir)
    images_name, labels_name = SPLIT_FILES[split]
    missing = [str(source / n) for n in (images_name, labels_name) if not (source / n).is_file()]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. "
            "Install them with `apt-get install dataset-fashion-mnist` (or pass source_dir)."
        )
    images, labels = load_idx(source / images_name, source / labels_name)
    positions = np.arange(len(labels)) if per_class is None else balanced_subset(labels, per_class, seed)

    prefix = f"fmnist-{split}"
    for stale in existing_outputs(out_dir, prefix):  # the data set is regenerated exactly
        stale.unlink()
    class_counts = [0] * len(CLASSES)
    writer = ShardWriter(out_dir, prefix)
    with writer:
        for shard_idx, shard in enumerate(assign_balanced(labels[positions].tolist(), num_shards, seed)):
            for pos, j in enumerate(shard):
                i = int(positions[j])
                cls = int(labels[i])
                meta = {"class": CLASSES[cls], "path": f"{images_name}#{i}"}
                writer.write(f"{shard_idx:06d}_{pos:06d}", _png_bytes(images[i]), "png", cls, meta)
                class_counts[cls] += 1
            writer.next_shard()
        shards = writer.close()
    return write_index(
        index_path(out_dir, prefix),
        shards,
        CLASSES,
        extra={
            "prefix": prefix,
            "class_counts": class_counts,
            "skipped": [],
            "source": str(source / images_name),
            "seed": seed,
        },
    )

