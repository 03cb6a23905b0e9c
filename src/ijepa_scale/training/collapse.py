"""Warn when collapse metrics stay below their thresholds for several consecutive progress lines."""

from __future__ import annotations

import logging
import math

logger = logging.getLogger("ijepa_scale")


class CollapseMonitor:
    def __init__(self, thresholds: dict[str, float], patience: int):
        """`thresholds`: metric name -> lower bound (0 disables that metric)."""
        self.thresholds = {name: t for name, t in thresholds.items() if t > 0}
        self.patience = patience
        self.below = {name: 0 for name in self.thresholds}

    def update(self, metrics: dict, step: int) -> list[str]:
        """Count consecutive lows; returns (and logs) the warnings due at this progress line."""
        warnings = []
        for name, threshold in self.thresholds.items():
            value = metrics.get(name)
            if value is None or not math.isfinite(value):
                continue  # a skipped step says nothing either way
            self.below[name] = self.below[name] + 1 if value < threshold else 0
            if self.below[name] == self.patience:  # once per episode below the threshold
                warnings.append(
                    f"possible collapse at step {step}: {name} = {value:.4g} has been below {threshold:g} for "
                    f"{self.patience} consecutive progress lines (threshold collapse.thresholds.{name})"
                )
        for message in warnings:
            logger.warning(message)
        return warnings

    def state_dict(self) -> dict:
        return {"below": dict(self.below)}

    def load_state_dict(self, state: dict) -> None:
        for name, count in state.get("below", {}).items():
            if name in self.below:
                self.below[name] = int(count)


def benchmark(argv=None) -> None:
    """Cost of the collapse metrics per step: `python -m ijepa_scale.training.collapse`."""
    import argparse
    import time

    import torch
    import torch.nn.functional as F

    from ..objectives.ijepa import collapse_metrics

    parser = argparse.ArgumentParser(prog="python -m ijepa_scale.training.collapse",
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


if __name__ == "__main__":
    benchmark()
