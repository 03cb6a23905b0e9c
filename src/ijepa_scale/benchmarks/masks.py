"""Time the multi-block mask sampler (default and legacy modes).

    python -m ijepa_scale.benchmarks.masks --batch-size 128 --crop-size 224 --patch-size 14 --iters 200
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave unchanged)")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error("--iters must be >= 1")

    results = benchmark_masks(
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        patch_size=args.patch_size,
        iters=args.iters,
        warmup=args.warmup,
        threads=args.threads or None,
    )
    grid = args.crop_size // args.patch_size
    print(
        f"multi-block masks: batch {args.batch_size}, crop {args.crop_size}, patch {args.patch_size} "
        f"({grid}x{grid} grid), {args.iters} iters, threads {args.threads or torch.get_num_threads()}"
    )
    for mode, r in results.items():
        print(
            f"{mode:>8}: mean {r['mean_ms']:.3f} ms  p50 {r['p50_ms']:.3f} ms  p95 {r['p95_ms']:.3f} ms  "
            f"| mean K_enc {r['mean_k_enc']:.1f}  K_pred {r['mean_k_pred']:.1f}  relaxed {r['relaxed']}"
        )


if __name__ == "__main__":
    main()
