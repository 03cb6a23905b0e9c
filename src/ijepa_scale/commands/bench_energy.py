"""`ijepa-scale bench-energy`: cost of one I-JEPA step with the energy transformer vs a ViT of the same width."""

from __future__ import annotations

import argparse

import torch

from ..benchmarks.energy import __doc__ as ENERGY_DOC, measure


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="ijepa-scale bench-energy", description=ENERGY_DOC.split("\n\n")[0])
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="energy iterations = ViT depth")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"width {args.embed_dim}, {args.steps} blocks/iterations, batch {args.batch}, "
          f"{(args.img // args.patch) ** 2} tokens, torch threads {torch.get_num_threads()}")
    base = None
    for kind in ("vit", "energy-autograd", "energy-analytic"):
        seconds, params = measure(kind, args)
        base = base or seconds
        print(f"{kind:16s} {seconds * 1e3:8.1f} ms/step  x{seconds / base:5.2f}  ({params / 1e6:.2f}M params)",
              flush=True)
