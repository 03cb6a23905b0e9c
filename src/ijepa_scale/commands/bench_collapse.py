"""`ijepa-scale bench-collapse`: milliseconds per step of the collapse metrics."""

from __future__ import annotations


def main(argv=None) -> None:
    import argparse
    import time

    import torch
    import torch.nn.functional as F

    from ..objectives.ijepa import collapse_metrics

    parser = argparse.ArgumentParser(prog="ijepa-scale bench-collapse",
                                     description="milliseconds per step of the collapse metrics")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per image (the demo: 8x8)")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--target-tokens", type=int, default=10, help="tokens per target block (4 blocks)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(args.batch_size, args.tokens, args.width, generator=gen)
    normed = F.layer_norm(tokens, (args.width,))
    pooled = tokens.mean(dim=1)
    predictions = torch.randn(4 * args.batch_size, args.target_tokens, args.width, generator=gen)
    collapse_metrics(predictions, normed, pooled)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(args.repeats):
            collapse_metrics(predictions, normed, pooled)
        timings.append((time.perf_counter() - start) / args.repeats * 1000)
    print(f"collapse metrics: {min(timings):.2f} ms per step (best of 3 x {args.repeats}; batch {args.batch_size}, "
          f"{args.tokens} tokens, width {args.width}, {args.threads} thread(s))")
