"""`ijepa-scale plan`: memory per GPU of a config at every ViT size, under DDP and FSDP, and the run's wall time."""

from __future__ import annotations

import argparse
import json
import sys

from ..benchmarks.plan import (
    __doc__ as PLAN_DOC, IN1K_TRAIN_IMAGES, format_time_plan, rate_from_bench_data, rate_from_bench_step,
    step_rate_from_tflops, table, time_plan,
)
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
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--imgs-per-s-per-gpu", type=float, default=None, metavar="X",
                      help="time side: the training step rate of one GPU (images/s)")
    rate.add_argument("--from-bench", metavar="FILE", default=None,
                      help="time side: the images/s of `ijepa-scale bench-step ... --json FILE`")
    rate.add_argument("--tflops-per-gpu", type=float, default=None, metavar="T",
                      help="time side: a sustained model-FLOP rate per GPU (TFLOP/s), turned into images/s with "
                           "this config's step FLOPs")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data-rate-per-core", type=float, default=None, metavar="Y",
                      help="loader images per CPU-second per core (for the cores per GPU needed)")
    data.add_argument("--from-bench-data", metavar="FILE", default=None,
                      help="the per-core rate from saved `ijepa-scale bench-data` output (its JSON line)")
    parser.add_argument("--images-per-epoch", type=int, default=IN1K_TRAIN_IMAGES,
                        help=f"training images per epoch (default {IN1K_TRAIN_IMAGES:,}, ImageNet-1k train)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the numbers as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.batch_size=64")
    args = parser.parse_args(argv)
    try:
        if args.gpus < 1 or args.gpu_mem <= 0:
            raise UserError(f"--gpus {args.gpus} / --gpu-mem {args.gpu_mem}: both must be positive")
        for flag in ("imgs_per_s_per_gpu", "tflops_per_gpu", "data_rate_per_core"):
            value = getattr(args, flag)
            if value is not None and value <= 0:
                raise UserError(f"--{flag.replace('_', '-')} {value:g}: must be positive")
        if args.images_per_epoch < 1:
            raise UserError(f"--images-per-epoch {args.images_per_epoch}: must be positive")
        args.sizes = args.sizes.split(",") if args.sizes else None
        unknown = [s for s in args.sizes or () if s not in VIT_SIZES]
        if unknown:
            raise UserError(f"--sizes {' '.join(unknown)}: not a ViT size; use {', '.join(VIT_SIZES)}")
        cfg = load_config(args.fname, args.overrides)
        if cfg.meta.model_name not in VIT_SIZES:
            raise UserError(f"meta.model_name={cfg.meta.model_name}: plan models ViT memory only; measure this "
                            f"model with `ijepa-scale bench-step` (peak memory) or plan a ViT size")
        rate, rate_source = None, ""
        if args.imgs_per_s_per_gpu:
            rate, rate_source = args.imgs_per_s_per_gpu, "given"
        elif args.from_bench:
            rate, note = rate_from_bench_step(args.from_bench, cfg)
            rate_source = f"bench-step {args.from_bench}{note}"
        elif args.tflops_per_gpu:
            rate = step_rate_from_tflops(cfg, args.tflops_per_gpu)
            rate_source = f"{args.tflops_per_gpu:g} model TFLOP/s per GPU"
        per_core, data_source = args.data_rate_per_core, "given"
        if args.from_bench_data:
            per_core, data_source = rate_from_bench_data(args.from_bench_data), f"bench-data {args.from_bench_data}"
        times = time_plan(cfg, args.gpus, rate, args.images_per_epoch, per_core) if rate else None
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(table(cfg, args.gpus, args.gpu_mem, args.sizes, args.unit))
    if times:
        print(format_time_plan(times, rate_source, data_source))
    elif per_core:
        print("time: give --imgs-per-s-per-gpu, --from-bench or --tflops-per-gpu for the run's wall time")
    if args.json:
        from ..benchmarks.plan import estimate, mean_tokens

        k_ctx, k_tgt = mean_tokens(cfg)
        memory = estimate(cfg, cfg.meta.model_name, args.gpus, k_ctx, k_tgt, override_dims=True)
        with open(args.json, "w") as f:
            json.dump({"memory_bytes": memory, "time": times}, f, indent=1)
    return 0
