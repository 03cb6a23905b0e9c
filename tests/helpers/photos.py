"""Test fixtures built from real photos shipped in pip wheels (skimage, sklearn): no downloads.

Class i of a generated data set is made of random crops of photo i (mod 10), so labels are
meaningful pseudo-labels and the JPEGs have real-photo statistics.
"""

from __future__ import annotations

import functools
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from ijepa_scale.data.shard_format import ShardWriter, index_path, write_index

_SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
)
_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@functools.lru_cache(maxsize=1)
def _load_photos() -> tuple[np.ndarray, ...]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in _SKIMAGE_PHOTOS]
    photos.append(skimage.data.stereo_motorcycle()[0])
    photos.extend(load_sample_images().images)
    for photo in photos:
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3, photo.shape
        photo.setflags(write=False)
    return tuple(photos)


@functools.lru_cache(maxsize=1)
def _pil_photos() -> tuple[Image.Image, ...]:
    return tuple(Image.fromarray(p) for p in _load_photos())


def real_photos() -> list[np.ndarray]:
    """The 10 real colour photos, HxWx3 uint8 (read-only, cached per process)."""
    return list(_load_photos())


def photo_crop(photo_idx: int, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A random crop (35-100% of the largest box of `size`'s aspect, random flip) of a photo."""
    photo = _pil_photos()[photo_idx % len(_load_photos())]
    aspect = size[0] / size[1]
    max_w = min(photo.width, photo.height * aspect)
    w = max_w * rng.uniform(0.35, 1.0) ** 0.5
    h = w / aspect
    left = rng.uniform(0, photo.width - w)
    top = rng.uniform(0, photo.height - h)
    img = photo.resize(size, Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def class_name(i: int) -> str:
    return f"class_{i:03d}"  # zero-padded so sorted names give class index order


def make_photo_folder(
    root: str | Path,
    num_classes: int = 4,
    per_class: int = 16,
    size: tuple[int, int] = (96, 72),
    seed: int = 0,
    fmt: str = "JPEG",
) -> Path:
    """ImageFolder tree `root/class_XXX/NNNN.jpg` of `size` (W, H) crops of the real photos."""
    root = Path(root)
    rng = random.Random(seed)
    ext = _EXTS[fmt]
    for c in range(num_classes):
        class_dir = root / class_name(c)
        class_dir.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            (class_dir / f"{n:04d}.{ext}").write_bytes(encode(photo_crop(c, size, rng), fmt))
    return root


def make_photo_shards(
    out_dir: str | Path,
    num_shards: int = 4,
    per_shard: int | None = None,
    sizes: list[int] | None = None,
    num_classes: int = 4,
    size: tuple[int, int] = (96, 72),
    seed: int = 0,
    prefix: str = "train",
) -> dict:
    """Shards + index in the project format; `sizes` gives explicit (uneven) shard sizes.

    Without `sizes`, `num_shards` shards of `per_shard` (default 16) samples. Sample j overall
    has class j % num_classes. Returns the index dict.
    """
    if sizes is None:
        sizes = [16 if per_shard is None else per_shard] * num_shards
    rng = random.Random(seed)
    classes = [class_name(c) for c in range(num_classes)]
    class_counts = [0] * num_classes
    sample_idx = 0
    with ShardWriter(out_dir, prefix) as writer:
        for shard_idx, count in enumerate(sizes):
            for pos in range(count):
                cls = sample_idx % num_classes
                data = encode(photo_crop(cls, size, rng))
                meta = {"class": classes[cls], "path": f"{classes[cls]}/{sample_idx:06d}.jpg"}
                writer.write(f"{shard_idx:06d}_{pos:06d}", data, "jpg", cls, meta)
                class_counts[cls] += 1
                sample_idx += 1
            writer.next_shard()
        shards = writer.close()
    return write_index(
        index_path(out_dir, prefix),
        shards,
        classes,
        extra={"prefix": prefix, "class_counts": class_counts, "skipped": []},
    )
