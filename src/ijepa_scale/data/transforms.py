"""Image transforms for I-JEPA pretraining, in PIL + numpy + torch (no torchvision).

The transform matches the official recipe (RandomResizedCrop, then optional flip, colour
distortion and Gaussian blur) but emits uint8 CHW tensors; `normalize` is applied to the
batch later, on the device. All randomness comes from a `random.Random` passed per call,
so an output is a pure function of (image, rng state).
"""

from __future__ import annotations

import io
import math
import random
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, UnidentifiedImageError

from ijepa_scale.data.image_encoding import to_rgb_or_l

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Formats whose decoder supports Image.draft() (DCT-domain downscaling).
_DRAFT_FORMATS = ("JPEG", "MPO")


class ImageDecodeError(ValueError):
    """Encoded bytes that are not a readable image (garbage, truncated, unsupported)."""


class CropBox(NamedTuple):
    left: int
    top: int
    width: int
    height: int


def open_image(data: bytes) -> Image.Image:
    """Open encoded image bytes lazily: only the header is parsed, pixels are decoded later."""
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageDecodeError(f"cannot open image ({len(data)} bytes): {e}") from e


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> CropBox:
    """RandomResizedCrop box sampling with torchvision's semantics.

    Ten tries of (area fraction ~ U(scale), aspect ~ log-U(ratio)); if none fits, a centre
    crop of the whole image clamped to the ratio range.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return CropBox(left, top, w, h)

    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return CropBox((width - w) // 2, (height - h) // 2, w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB."""
    img = to_rgb_or_l(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """Shift hue by `hue_factor` turns (in [-0.5, 0.5]) via PIL HSV, like torchvision's PIL path."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor must be in [-0.5, 0.5], got {hue_factor}")
    if img.mode in ("L", "1", "I", "F"):
        return img
    mode = img.mode
    h, s, v = img.convert("HSV").split()
    shift = int(round(hue_factor * 255)) % 256
    hue = ((np.asarray(h, dtype=np.uint16) + shift) % 256).astype(np.uint8)
    h = Image.fromarray(hue, "L")
    return Image.merge("HSV", (h, s, v)).convert(mode)


def _color_jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """torchvision ColorJitter(0.8s, 0.8s, 0.8s, 0.2s): four adjustments in random order."""
    amount = 0.8 * strength
    hue_amount = min(0.2 * strength, 0.5)
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    brightness = rng.uniform(max(0.0, 1 - amount), 1 + amount)
    contrast = rng.uniform(max(0.0, 1 - amount), 1 + amount)
    saturation = rng.uniform(max(0.0, 1 - amount), 1 + amount)
    hue = rng.uniform(-hue_amount, hue_amount)
    for op in order:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(brightness)
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(contrast)
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(saturation)
        else:
            img = adjust_hue(img, hue)
    return img


class ImageTransform:
    """RandomResizedCrop (+ optional official augmentations) -> uint8 tensor [3, S, S].

    The image passed in is consumed: with `use_draft` a lazily opened JPEG is decoded at
    reduced size in place.
    """

    def __init__(
        self,
        crop_size: int,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        horizontal_flip: bool = False,
        color_distortion: bool = False,
        color_jitter_strength: float = 1.0,
        gaussian_blur: bool = False,
        use_draft: bool = True,
    ):
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not 0 < crop_scale[0] <= crop_scale[1]:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max, got {crop_scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if color_jitter_strength < 0:
            raise ValueError(f"color_jitter_strength must be >= 0, got {color_jitter_strength}")
        self.crop_size = int(crop_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.horizontal_flip = horizontal_flip
        self.color_distortion = color_distortion
        self.color_jitter_strength = color_jitter_strength
        self.gaussian_blur = gaussian_blur
        self.use_draft = use_draft

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_size={self.crop_size}, crop_scale={self.crop_scale}, "
            f"ratio={self.ratio}, horizontal_flip={self.horizontal_flip}, "
            f"color_distortion={self.color_distortion}, "
            f"color_jitter_strength={self.color_jitter_strength}, "
            f"gaussian_blur={self.gaussian_blur}, use_draft={self.use_draft})"
        )

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        # The box is sampled from the header size, before any draft, so the rng stream
        # (and hence the crop) is the same with and without draft.
        box = sample_crop_box(img.width, img.height, self.crop_scale, self.ratio, rng)
        img, resize_box = self._decode(img, box)
        img = img.resize((self.crop_size, self.crop_size), Image.BILINEAR, box=resize_box)
        if img.mode != "RGB":
            img = to_rgb(img)

        if self.horizontal_flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.color_distortion:
            if rng.random() < 0.8:
                img = _color_jitter(img, self.color_jitter_strength, rng)
            if rng.random() < 0.2:
                img = img.convert("L").convert("RGB")
        if self.gaussian_blur and rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))

        arr = np.array(img, dtype=np.uint8)  # a writable copy, HWC
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def _decode(
        self, img: Image.Image, box: CropBox
    ) -> tuple[Image.Image, tuple[float, float, float, float]]:
        """Decode the image (at reduced size when possible); return it and the resize box."""
        left, top, right, bottom = box.left, box.top, box.left + box.width, box.top + box.height
        reduction = self._draft_reduction(img, box)
        if reduction > 1:
            full_width = img.width
            # Requesting (W // r, H // r) makes PIL pick exactly scale r (r a power of two).
            drafted = img.draft("RGB", (img.width // reduction, img.height // reduction))
            if drafted is not None:
                scale = full_width / drafted[1][2]
                left, top, right, bottom = (c / scale for c in (left, top, right, bottom))
                right, bottom = min(right, img.width), min(bottom, img.height)
        try:
            img.load()
        except (OSError, SyntaxError) as e:
            raise ImageDecodeError(f"cannot decode {img.format} image {img.size}: {e}") from e
        # L is resized as is and converted after the (cheaper) resize; modes like P, RGBA or
        # CMYK are converted first (P would resize with NEAREST, RGBA premultiplies alpha).
        return to_rgb_or_l(img), (left, top, right, bottom)

    def _draft_reduction(self, img: Image.Image, box: CropBox) -> int:
        """Largest power-of-two reduction (<= 8) that keeps the crop >= the output size."""
        if not self.use_draft or img.format not in _DRAFT_FORMATS or not img.tile:
            return 1
        fit = min(box.width, box.height) // self.crop_size
        for reduction in (8, 4, 2):
            if fit >= reduction:
                return reduction
        return 1


def normalize(
    batch_uint8: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [B, 3, H, W] (or [3, H, W]) in 0..255 -> (x / 255 - mean) / std, on its device."""
    if batch_uint8.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {batch_uint8.dtype}")
    channels = batch_uint8.shape[-3]
    if channels != len(mean) or channels != len(std):
        raise ValueError(
            f"tensor has {channels} channels but mean/std have {len(mean)}/{len(std)}"
        )
    device = batch_uint8.device
    mean_t = torch.tensor(mean, dtype=torch.float64).mul(255).to(device=device, dtype=dtype)
    inv_std_t = torch.tensor(std, dtype=torch.float64).mul(255).reciprocal()
    inv_std_t = inv_std_t.to(device=device, dtype=dtype)
    out = batch_uint8.to(dtype).sub_(mean_t.view(-1, 1, 1))
    return out.mul_(inv_std_t.view(-1, 1, 1))
