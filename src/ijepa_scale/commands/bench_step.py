"""`ijepa-scale bench-step`: the training step of a config, phase by phase."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from ..benchmarks.step import __doc__ as STEP_DOC, run
from ..config import load_config
from ..errors import UserError, one_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ijepa-scale bench-step", description=STEP_DOC.split("\n\n")[0])
    parser.add_argument("--fname", required=True, help="YAML config (model, crop, patch, masks, batch, dtype)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--vs-official", action="store_true", help="also time an official-style step")
    parser.add_argument("--vs-base", action="store_true",
                        help="also time the --fname config without the command-line overrides, interleaved step by "
                             "step (e.g. overrides that switch to meta.model_name=energy_transformer vs the "
                             "YAML's ViT)")
    parser.add_argument("--process-group", action="store_true",
                        help="start a one-rank process group (nccl on cuda, gloo on cpu) so that distributed.parallel "
                             "wraps the models as across ranks: DDP-of-one or FSDP-of-one")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the result and the settings as JSON (for `ijepa-scale plan --from-bench`)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as data.batch_size=32")
    args = parser.parse_args(argv)
    try:
        if args.steps < 1 or args.warmup < 0:
            raise UserError(f"--steps {args.steps} / --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise UserError(f"--json {args.json}: its folder does not exist")
        cfg = load_config(args.fname, args.overrides)
        vs = load_config(args.fname) if args.vs_base else None
        from ..distributed.env import parse_device

        device = parse_device(args.device, flag="--device")
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.process_group:
        _one_rank_group(device)
    try:
        result = run(cfg, device, steps=args.steps, warmup=args.warmup, vs_official=args.vs_official, vs=vs,
                     wrap_alone=args.process_group)
    finally:
        if args.process_group:
            dist.destroy_process_group()
    if args.json:
        from ..benchmarks.plan import settings_of

        settings = dict(settings_of(cfg), device=str(device), steps=args.steps, warmup=args.warmup,
                        process_group=args.process_group)
        with open(args.json, "w") as f:
            json.dump(dict(result, settings=settings), f)
    return 0


def _one_rank_group(device: torch.device) -> None:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, device_id=device if device.type == "cuda" else None)
