"""`ijepa-scale bench-masks`: speed of the multi-block mask sampler."""

from __future__ import annotations

import argparse

import torch

from ..benchmarks.masks import __doc__ as MASKS_DOC, benchmark_masks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ijepa-scale bench-masks", description=MASKS_DOC.splitlines()[0])
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
