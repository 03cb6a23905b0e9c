"""Representation analysis: attention maps over images and the correlation dimension of token embeddings.

Pictures are written as PNG with Pillow (no plotting library needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


# --------------------------------------------------------------------------------------------
# Attention maps
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_maps(encoder, images: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """softmax(Q K^T / sqrt(d_head)) of the chosen blocks of a ViT encoder, {layer: [B, heads, N, N]}.

    Computed from each block's pre-norm input while the normal forward runs (positions included).
    """
    wanted = set(int(layer) for layer in layers)
    bad = sorted(layer for layer in wanted if not 0 <= layer < len(encoder.blocks))
    if bad:
        raise ValueError(f"layers {bad} are outside the encoder's blocks 0..{len(encoder.blocks) - 1}")
    maps = {}
    x = encoder.embed(images)
    for index, block in enumerate(encoder.blocks):
        if index in wanted:
            attn = block.attn
            batch, tokens, dim = x.shape
            qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
            q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            maps[index] = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
        x = block(x)
    return maps


def to_display(images: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, C, H, W] -> RGB in [0, 1], each image min-max scaled."""
    x = images.float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def attention_overlay(display: torch.Tensor, maps: torch.Tensor, patch: int | None = None,
                      alpha: float = 0.5) -> torch.Tensor:
    """Overlay [B, N, N] attention (one head, or a mean over heads) on RGB images [B, 3, H, W] in [0, 1].

    ``patch`` p: column p of the map, how much every query attends to key p; None: the mean attention each
    key receives. The heat map is upsampled to the image, divided by its max and added to the red channel.
    """
    batch, tokens, _ = maps.shape
    side = math.isqrt(tokens)
    heat = maps[:, :, patch] if patch is not None else maps.mean(dim=1)
    heat = F.interpolate(heat.reshape(batch, 1, side, side).float(), size=display.shape[-2:], mode="bilinear",
                         align_corners=False)
    heat = heat / heat.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    out = display.clone()
    out[:, :1] = out[:, :1] + alpha * heat
    return out.clamp(0, 1)


def save_image_grid(tiles: torch.Tensor, path: str | Path, pad: int = 2) -> Path:
    """Save [rows, cols, 3, H, W] RGB tiles in [0, 1] as one PNG with white padding."""
    rows, cols, _, height, width = tiles.shape
    canvas = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, 3), 255, dtype=np.uint8)
    pixels = (tiles.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            canvas[top:top + height, left:left + width] = pixels[r, c]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas, "RGB").save(path)
    return path


def attention_grid(encoder, images: torch.Tensor, layers: Sequence[int], heads: Sequence[int] | None = None,
                   patch: int | None = None, scale: int = 4) -> torch.Tensor:
    """Tiles [B, 1 + len(layers) * len(heads or [mean]), 3, H*scale, W*scale]: each image, then its overlays
    for every (layer, head) in order (``heads`` None: the mean over heads)."""
    maps = attention_maps(encoder, images, layers)
    display = to_display(images)
    if scale > 1:
        display = F.interpolate(display, scale_factor=scale, mode="nearest")
    columns = [display]
    for layer in layers:
        per_head = maps[int(layer)]
        for head in (heads if heads is not None else [None]):
            chosen = per_head.mean(dim=1) if head is None else per_head[:, head]
            columns.append(attention_overlay(display, chosen, patch))
    return torch.stack(columns, dim=1)


# --------------------------------------------------------------------------------------------
# Correlation dimension
# --------------------------------------------------------------------------------------------
@dataclass
class CorrelationDimension:
    dimension: float
    intercept: float
    log_radii: np.ndarray  # radii used in the fit, log in ``base``
    log_counts: np.ndarray  # C(r) at those radii, log in the same base
    base: float


@torch.no_grad()
def correlation_dimension(points: torch.Tensor, num_radii: int = 10, base: float = 10.0,
                          min_pairs: int | None = None) -> CorrelationDimension:
    """Correlation dimension of [n, D] points: the slope of log C(r) against log r, one base on both axes.

    C(r) = #{unordered pairs closer than r} / n^2. The radii are log-spaced from a small distance to the
    log-midpoint of it and the largest distance (large radii saturate). Radii up to and including the
    last one with no pair, and always the first one, are left out of the fit. The small distance is the
    ``min_pairs``-th smallest positive one (default n): the original starts at the very smallest, where
    the counts are a handful of pairs and the slope swings by +-0.3 between samples of the same manifold
    (measured on 2,000 points on a unit segment, square and cube; ``min_pairs=1`` is the original).
    The original also fits ln C against log10 r, which inflates the slope by ln 10 = 2.303.
    """
    if points.dim() != 2 or len(points) < 3:
        raise ValueError(f"need [n >= 3, D] points, got shape {tuple(points.shape)}")
    if not base > 1:
        raise ValueError(f"log base must be > 1, got {base}")
    distances = torch.pdist(points.double()).sort().values
    positive = distances[distances > 0]
    if len(positive) == 0:
        raise ValueError("all points coincide; the correlation dimension is undefined")
    log = lambda v: torch.log(v) / math.log(base)
    rank = len(points) if min_pairs is None else min_pairs
    low = log(positive[min(max(rank, 1), len(positive)) - 1])
    high = (low + log(distances[-1])) / 2
    log_radii = torch.linspace(low.item(), high.item(), num_radii, dtype=torch.float64)
    counts = torch.searchsorted(distances, base ** log_radii, right=False)
    zero = (counts == 0).nonzero()
    first = max(1, int(zero.max()) + 1 if len(zero) else 0)
    if num_radii - first < 2:
        raise ValueError("fewer than 2 radii with pairs below them; use more points or radii")
    log_radii = log_radii[first:].numpy()
    log_counts = log(counts[first:].double() / len(points) ** 2).numpy()
    slope, intercept = np.polyfit(log_radii, log_counts, 1)
    return CorrelationDimension(float(slope), float(intercept), log_radii, log_counts, base)


def plot_correlation_dimension(result: CorrelationDimension, path: str | Path, size=(640, 480)) -> Path:
    """PNG of log C(r) against log r (points) with the fitted line and the slope in the title."""
    width, height = size
    margin = 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs, ys = result.log_radii, result.log_counts
    fit = result.dimension * xs + result.intercept
    x_lo, x_hi = float(xs.min()), float(xs.max())
    y_lo, y_hi = float(min(ys.min(), fit.min())), float(max(ys.max(), fit.max()))
    x_span, y_span = max(x_hi - x_lo, 1e-12), max(y_hi - y_lo, 1e-12)
    to_px = lambda x, y: (margin + (x - x_lo) / x_span * (width - 2 * margin),
                          height - margin - (y - y_lo) / y_span * (height - 2 * margin))
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.line([to_px(xs[0], fit[0]), to_px(xs[-1], fit[-1])], fill=(200, 30, 30), width=2)
    for x, y in zip(xs, ys):
        px, py = to_px(x, y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], outline=(30, 60, 200), width=2)
    name = "ln" if abs(result.base - math.e) < 1e-9 else f"log{result.base:g}"
    draw.text((margin, 20), f"correlation dimension {result.dimension:.3f} (slope; {name} on both axes)", fill="black")
    draw.text((width // 2 - 30, height - margin + 25), f"{name} r", fill="black")
    draw.text((5, height // 2), f"{name} C(r)", fill="black")
    for value, anchor in ((x_lo, "la"), (x_hi, "ra")):
        draw.text((to_px(value, y_lo)[0], height - margin + 5), f"{value:.2f}", fill="black", anchor=anchor)
    for value in (y_lo, y_hi):
        draw.text((margin - 5, to_px(x_lo, value)[1]), f"{value:.2f}", fill="black", anchor="rm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# --------------------------------------------------------------------------------------------
# Gated I-JEPA: what the gates learned
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def open_probabilities(student, images: torch.Tensor) -> torch.Tensor:
    """sigmoid(log_alpha) [B, N] of a GatedViT at its own gate location (the original always rebuilt the
    model with final-token gating, which disagrees with a model trained with gating inside a block)."""
    _, _, log_alpha = student(images)
    return torch.sigmoid(log_alpha)


def gate_map_summary(open_probs: torch.Tensor) -> dict:
    """Mean open probability per position [side, side], and its mean in the central half box and in the
    four quarter-size corners."""
    side = math.isqrt(open_probs.shape[1])
    mean_map = open_probs.float().mean(dim=0).reshape(side, side)
    lo, hi = side // 4, side - side // 4
    quarter = max(1, side // 4)
    corners = torch.cat([mean_map[:quarter, :quarter].flatten(), mean_map[:quarter, -quarter:].flatten(),
                         mean_map[-quarter:, :quarter].flatten(), mean_map[-quarter:, -quarter:].flatten()])
    return {"map": mean_map, "centre_mean": mean_map[lo:hi, lo:hi].mean().item(),
            "corner_mean": corners.mean().item()}


def save_heat_map(values: torch.Tensor, path: str | Path, scale: int = 16) -> Path:
    """A [h, w] map in [0, 1] as a grayscale PNG (white = 1), each cell ``scale`` pixels wide."""
    pixels = (values.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").resize((values.shape[1] * scale, values.shape[0] * scale), Image.NEAREST).save(path)
    return path


def closed_token_loss(prediction: torch.Tensor, target: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """mean_b sum_i (1 - r_bi) ||p_bi - t_bi||^2 / (sum_i (1 - r_bi) + 1e-6): the error on closed tokens."""
    closed = 1.0 - gates.float()
    errors = (prediction.float() - target.float()).pow(2).sum(dim=-1)
    return ((closed * errors).sum(dim=1) / (closed.sum(dim=1) + 1e-6)).mean()


@torch.no_grad()
def gate_ablation(student, predictor, teacher, images: torch.Tensor, generator: torch.Generator | None = None):
    """Reconstruction error with the learned hard gates, with random gates of the same per-image open rate
    (Bernoulli(mean_i pi_bi) per token), both on closed tokens, and with every gate open (all tokens).
    The modules must be in eval mode."""
    target = teacher(images)
    target = F.layer_norm(target, (target.size(-1),))
    norm = lambda x: F.layer_norm(x, (x.size(-1),))
    learned_tokens, learned_gates, log_alpha = student(images)
    rate = torch.sigmoid(log_alpha).mean(dim=1, keepdim=True).expand_as(log_alpha)
    random_gates = torch.bernoulli(rate.cpu(), generator=generator).to(images.device)
    random_tokens, _, _ = student(images, gates=random_gates)
    open_tokens, _, _ = student(images, gated=False)
    return {
        "learned": closed_token_loss(norm(predictor(learned_tokens)), target, learned_gates).item(),
        "random": closed_token_loss(norm(predictor(random_tokens)), target, random_gates).item(),
        "all_open": (norm(predictor(open_tokens)) - target).pow(2).sum(dim=-1).mean().item(),
        "learned_open_fraction": learned_gates.mean().item(),
        "random_open_fraction": random_gates.mean().item(),
    }


@torch.no_grad()
def open_fraction_real_vs_noise(student, images: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """Per-image open fraction mean_i pi for the images and for N(0, 1) noise of the same shape."""
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    real = open_probabilities(student, images).mean(dim=1)
    fake = open_probabilities(student, noise).mean(dim=1)
    return {"real": real, "noise": fake}
