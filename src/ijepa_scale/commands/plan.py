"""`ijepa-scale plan`: memory per GPU of a config at every ViT size, under DDP and FSDP."""

from __future__ import annotations

import argparse
import sys

from ..benchmarks.plan import __doc__ as PLAN_DOC, table
from ..config import load_config
from ..errors import UserError, one_line
from ..models.vision_transformer import VIT_SIZES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ijepa-scale plan", description=PLAN_DOC.split("\n\n")[0])
    parser.add_argument("--fname", required=True, help="YAML config (crop, patch, masks, batch, dtype, predictor)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the run (FSDP shards over all; default 8)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated encoder sizes (default all: {','.join(VIT_SIZES)})")
    parser.add_argument("--unit", choices=("GiB", "MiB"), default="GiB", help="memory unit of the table")
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.batch_size=64")
    args = parser.parse_args(argv)
    try:
        if args.gpus < 1 or args.gpu_mem <= 0:
            raise UserError(f"--gpus {args.gpus} / --gpu-mem {args.gpu_mem}: both must be positive")
        args.sizes = args.sizes.split(",") if args.sizes else None
        unknown = [s for s in args.sizes or () if s not in VIT_SIZES]
        if unknown:
            raise UserError(f"--sizes {' '.join(unknown)}: not a ViT size; use {', '.join(VIT_SIZES)}")
        cfg = load_config(args.fname, args.overrides)
        if cfg.meta.model_name not in VIT_SIZES:
            raise UserError(f"meta.model_name={cfg.meta.model_name}: plan models ViT memory only; measure this "
                            f"model with `ijepa-scale bench-step` (peak memory) or plan a ViT size")
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(table(cfg, args.gpus, args.gpu_mem, args.sizes, args.unit))
    return 0
