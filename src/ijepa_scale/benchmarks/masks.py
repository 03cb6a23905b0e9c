"""Time the multi-block mask sampler (default and legacy modes).

    ijepa-scale bench-masks --batch-size 128 --crop-size 224 --patch-size 14 --iters 200
"""

from __future__ import annotations

import statistics
import time

import torch

from ijepa_scale.masks import MultiBlockMaskCollator

# Mask settings shared by all released in1k configs.
OFFICIAL_IN1K_MASK = dict(
    enc_mask_scale=(0.85, 1.0),
    pred_mask_scale=(0.15, 0.2),
    aspect_ratio=(0.75, 1.5),
    nenc=1,
    npred=4,
    min_keep=10,
    allow_overlap=False,
)


def _percentile(sorted_values: list[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def benchmark_masks(
    batch_size: int = 128,
    crop_size: int = 224,
    patch_size: int = 14,
    iters: int = 200,
    warmup: int = 10,
    threads: int | None = 1,
    modes: tuple[str, ...] = ("default", "legacy"),
) -> dict[str, dict[str, float]]:
    """Return ``{mode: {"mean_ms", "p50_ms", "p95_ms", "mean_k_enc", "mean_k_pred", "relaxed"}}``.

    ``threads`` sets ``torch.set_num_threads`` for the duration of the run (None: unchanged).
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        results = {}
        for mode in modes:
            if mode not in ("default", "legacy"):
                raise ValueError(f"unknown mode {mode!r}")
            collator = MultiBlockMaskCollator(
                input_size=crop_size,
                patch_size=patch_size,
                legacy_sampler=(mode == "legacy"),
                **OFFICIAL_IN1K_MASK,
            )
            for step in range(warmup):
                collator.sample(batch_size, step)
            times_ms, k_enc, k_pred = [], [], []
            for step in range(warmup, warmup + iters):
                start = time.perf_counter()
                masks_enc, masks_pred = collator.sample(batch_size, step)
                times_ms.append((time.perf_counter() - start) * 1e3)
                k_enc.append(masks_enc[0].shape[1])
                k_pred.append(masks_pred[0].shape[1])
            ordered = sorted(times_ms)
            results[mode] = {
                "mean_ms": statistics.fmean(times_ms),
                "p50_ms": _percentile(ordered, 0.50),
                "p95_ms": _percentile(ordered, 0.95),
                "mean_k_enc": statistics.fmean(k_enc),
                "mean_k_pred": statistics.fmean(k_pred),
                "relaxed": collator.num_relaxed,
            }
        return results
    finally:
        torch.set_num_threads(previous_threads)

