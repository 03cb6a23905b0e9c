"""Tests for ijepa_scale.data.transforms on real photos."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_scale.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    ImageTransform,
    adjust_hue,
    normalize,
    open_image,
    sample_crop_box,
)

from tests.helpers.photos import real_photos

PHOTO_NAMES = ["astronaut", "chelsea", "coffee", "rocket", "hubble", "ihc", "retina", "motorcycle",
               "china", "flower"]


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    return jpeg_bytes(real_photos()[PHOTO_NAMES.index("coffee")])  # 600x400


@pytest.fixture(scope="module")
def large_jpegs() -> list[bytes]:
    # Natural-size large photos: retina 1411x1411, hubble 1000x872, plus china upscaled 2.5x.
    photos = real_photos()
    china = Image.fromarray(photos[PHOTO_NAMES.index("china")]).resize((1600, 1068), Image.BICUBIC)
    return [
        jpeg_bytes(photos[PHOTO_NAMES.index("retina")]),
        jpeg_bytes(photos[PHOTO_NAMES.index("hubble")]),
        jpeg_bytes(np.asarray(china)),
    ]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(255**2 / max(mse, 1e-12))


def test_output_is_uint8_chw(photo_jpeg):
    out = ImageTransform(64)(open_image(photo_jpeg), random.Random(0))
    assert out.dtype == torch.uint8
    assert out.shape == (3, 64, 64)
    assert out.is_contiguous()
    assert 20 < out.float().mean().item() < 235  # a real image, not a blank


def test_same_seed_same_output_and_different_seeds_differ(photo_jpeg):
    transform = ImageTransform(48, horizontal_flip=True, color_distortion=True, gaussian_blur=True)
    a = transform(open_image(photo_jpeg), random.Random(123))
    b = transform(open_image(photo_jpeg), random.Random(123))
    c = transform(open_image(photo_jpeg), random.Random(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rng_state_advances_identically_with_and_without_draft(large_jpegs):
    rng_a, rng_b = random.Random(5), random.Random(5)
    ImageTransform(64, use_draft=True)(open_image(large_jpegs[0]), rng_a)
    ImageTransform(64, use_draft=False)(open_image(large_jpegs[0]), rng_b)
    assert rng_a.random() == rng_b.random()


def test_crop_boxes_within_bounds_with_configured_scale_and_ratio():
    rng = random.Random(0)
    width, height = 640, 480
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
    fractions, aspects = [], []
    for _ in range(4000):
        left, top, w, h = sample_crop_box(width, height, scale, ratio, rng)
        assert 0 <= left and 0 <= top and w > 0 and h > 0
        assert left + w <= width and top + h <= height
        fractions.append(w * h / (width * height))
        aspects.append(w / h)
    fractions, aspects = np.array(fractions), np.array(aspects)
    assert fractions.min() >= 0.3 - 0.01 and fractions.max() <= 1.0
    assert aspects.min() >= 0.75 - 0.01 and aspects.max() <= 4 / 3 + 0.01
    # Large areas may not fit and are redrawn, but small ones always fit, so below 0.5
    # the area fraction is uniform: P(f < 0.4 | f < 0.5) = 0.5.
    small = fractions[fractions < 0.5]
    assert abs((small < 0.4).mean() - 0.5) < 0.06
    assert aspects.min() < 0.8 and aspects.max() > 1.25


def test_crop_box_distribution_when_every_draw_fits():
    rng = random.Random(1)
    boxes = [sample_crop_box(1000, 1000, (0.1, 0.5), (3 / 4, 4 / 3), rng) for _ in range(4000)]
    fractions = np.array([w * h / 1e6 for _, _, w, h in boxes])
    log_aspects = np.array([math.log(w / h) for _, _, w, h in boxes])
    assert abs(fractions.mean() - 0.3) < 0.01  # U(0.1, 0.5)
    assert abs((fractions < 0.2).mean() - 0.25) < 0.03
    assert abs(log_aspects.mean()) < 0.01  # log-uniform ratio is symmetric around 1
    assert abs(log_aspects.std() - math.log(4 / 3) / math.sqrt(3)) < 0.01
    # Positions are uniform over the free range: the mean left offset is half of it.
    assert abs(np.mean([left / (1000 - w) for left, _, w, _ in boxes]) - 0.5) < 0.03


def test_crop_box_fallback_is_centre_crop_clamped_to_ratio():
    rng = random.Random(0)
    # No area above the whole image can fit, so all ten tries fail.
    assert sample_crop_box(400, 100, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (133, 0, 133, 100)
    assert sample_crop_box(100, 400, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (0, 133, 100, 133)
    assert sample_crop_box(120, 100, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (0, 0, 120, 100)


def test_full_crop_equals_plain_bilinear_resize(photo_jpeg):
    # scale=(1,1), ratio=(1.5,1.5) on a 600x400 image: the crop is the whole image.
    transform = ImageTransform(32, crop_scale=(1.0, 1.0), ratio=(1.5, 1.5), use_draft=False)
    out = transform(open_image(photo_jpeg), random.Random(0))
    expected = np.asarray(open_image(photo_jpeg).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert torch.equal(out, torch.from_numpy(expected.copy()).permute(2, 0, 1))


@pytest.mark.parametrize("crop_size", [64, 160])
def test_draft_decode_is_close_to_full_decode(large_jpegs, crop_size):
    drafted = 0
    for i, data in enumerate(large_jpegs):
        for seed in range(4):
            img = open_image(data)
            full_size = img.size
            fast = ImageTransform(crop_size, use_draft=True)(img, random.Random(seed))
            drafted += img.size != full_size  # draft() shrinks the image in place
            slow = ImageTransform(crop_size, use_draft=False)(open_image(data), random.Random(seed))
            assert psnr(fast, slow) > 32, (i, seed)
            assert (fast.float() - slow.float()).abs().mean() < 2.5, (i, seed)
    assert drafted >= 10  # the reduced decode really ran on (nearly) every sample


def test_draft_not_used_for_small_crops_or_when_disabled(photo_jpeg, large_jpegs):
    img = open_image(photo_jpeg)  # 600x400 with scale >= 0.3: crop < 2 x 224 in some dim
    ImageTransform(224)(img, random.Random(0))
    assert img.size == (600, 400)
    img = open_image(large_jpegs[0])
    ImageTransform(64, use_draft=False)(img, random.Random(0))
    assert img.size == (1411, 1411)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_non_rgb_modes_become_rgb(mode):
    rgb = Image.fromarray(real_photos()[0])
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        assert img.mode == "I;16"
    else:
        img = rgb.convert(mode)
    out = ImageTransform(40, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0))(img, random.Random(0))
    assert out.shape == (3, 40, 40) and out.dtype == torch.uint8
    reference = ImageTransform(40, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0))(rgb, random.Random(0))
    if mode in ("L", "LA", "I;16"):
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        gray = reference.float().mean(0)
        assert (out[0].float() - gray).abs().mean() < 8
    else:
        assert (out.float() - reference.float()).abs().mean() < (12 if mode == "P" else 2)


def test_grayscale_and_rgba_png_bytes():
    photo = real_photos()[1]
    for mode in ("L", "RGBA"):
        buf = io.BytesIO()
        Image.fromarray(photo).convert(mode).save(buf, "PNG")
        out = ImageTransform(32)(open_image(buf.getvalue()), random.Random(0))
        assert out.shape == (3, 32, 32)


def test_garbage_and_truncated_bytes_raise_decode_error(photo_jpeg):
    with pytest.raises(ImageDecodeError):
        open_image(b"this is not an image")
    truncated = open_image(photo_jpeg[: len(photo_jpeg) // 3])
    with pytest.raises(ImageDecodeError):
        ImageTransform(32)(truncated, random.Random(0))


def test_flip_only_when_enabled(photo_jpeg):
    base = ImageTransform(48)
    flipping = ImageTransform(48, horizontal_flip=True)
    flipped = 0
    for seed in range(24):
        # The crop box is drawn first, so the same seed gives the same crop in both.
        plain = base(open_image(photo_jpeg), random.Random(seed))
        out = flipping(open_image(photo_jpeg), random.Random(seed))
        if torch.equal(out, plain.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(out, plain)
    assert 4 <= flipped <= 20  # p = 0.5


def test_colour_distortion_only_when_enabled(photo_jpeg):
    base = ImageTransform(48)
    disabled = ImageTransform(48, color_distortion=False, color_jitter_strength=5.0)
    distort = ImageTransform(48, color_distortion=True)
    changed = gray = 0
    for seed in range(30):
        plain = base(open_image(photo_jpeg), random.Random(seed))
        assert torch.equal(disabled(open_image(photo_jpeg), random.Random(seed)), plain)
        out = distort(open_image(photo_jpeg), random.Random(seed))
        changed += (out.float() - plain.float()).abs().mean().item() > 1.0
        gray += bool(torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]))
    # P(unchanged) = P(no jitter and no grayscale) = 0.2 * 0.8 = 0.16; P(gray) = 0.2.
    assert changed >= 18
    assert 1 <= gray <= 14


def test_blur_only_when_enabled_and_smooths(photo_jpeg):
    base = ImageTransform(64)
    blur = ImageTransform(64, gaussian_blur=True)
    blurred = 0
    for seed in range(20):
        plain = base(open_image(photo_jpeg), random.Random(seed))
        out = blur(open_image(photo_jpeg), random.Random(seed))
        if torch.equal(out, plain):
            continue
        blurred += 1
        def roughness(x):
            return (x[..., 1:].float() - x[..., :-1].float()).abs().mean()
        assert roughness(out) < roughness(plain)
    assert 3 <= blurred <= 17  # p = 0.5


def test_adjust_hue_rotates_colours():
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    cyan = np.asarray(adjust_hue(red, 0.5))[0, 0].astype(int)  # 8-bit HSV: within a few levels
    assert np.abs(cyan - [0, 255, 255]).max() <= 4
    assert np.asarray(adjust_hue(red, 1 / 3))[0, 0, 1] > 240  # towards green
    photo = Image.fromarray(real_photos()[2])
    unchanged = np.asarray(adjust_hue(photo, 0.0), dtype=np.float32)
    assert np.abs(unchanged - np.asarray(photo, dtype=np.float32)).mean() < 2.0
    with pytest.raises(ValueError):
        adjust_hue(red, 0.7)


def test_normalize_matches_manual_computation():
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen)
    out = normalize(batch)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (batch.float() / 255 - mean) / std
    assert out.dtype == torch.float32 and out.shape == batch.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert batch.dtype == torch.uint8  # input untouched
    custom = normalize(batch, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(custom, batch.float() / 127.5 - 1, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError):
        normalize(batch.float())


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        ImageTransform(0)
    with pytest.raises(ValueError):
        ImageTransform(32, crop_scale=(0.8, 0.2))
    with pytest.raises(ValueError):
        ImageTransform(32, ratio=(0.0, 1.0))
