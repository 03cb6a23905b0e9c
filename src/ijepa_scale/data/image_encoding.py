"""Image bytes as stored in a shard: checked and kept as they are, or converted (RGB, resized, re-encoded)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Source files of these formats are stored byte-for-byte (unless resized).
_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
JPEG_QUALITY = 95


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
        size = _short_side_size(img.size, resize_short_side)
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


def _short_side_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    width, height = size
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _resized(img: Image.Image, short_side: int) -> Image.Image:
    return img.resize(_short_side_size(img.size, short_side), Image.LANCZOS)
