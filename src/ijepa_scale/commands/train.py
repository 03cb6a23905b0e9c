"""`ijepa-scale train` (and main.py): pretrain on local devices, one rank per device, or as one torchrun rank."""

from __future__ import annotations

import argparse
import sys

from ..version import VersionAction


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description="I-JEPA pretraining on local devices")
    parser.add_argument("--fname", type=str, default="configs.yaml", help="YAML config file")
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--devices", type=str, nargs="+", default=None,
                        help="one rank per device, e.g. cuda:0 cuda:1 or cpu cpu (default cuda:0)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as optimization.epochs=2")
    args = parser.parse_args(argv)
    if args.devices:
        # `--devices cpu cpu data.batch_size=8`: argparse hands the overrides to --devices.
        args.overrides = [d for d in args.devices if "=" in d] + args.overrides
        args.devices = [d for d in args.devices if "=" not in d]
    return args


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)  # before the heavy imports: --help and --version answer at once
    from ..config import load_config
    from ..errors import UserError, one_line
    from ..launchers.local import launch

    try:
        cfg = load_config(args.fname, args.overrides)
        return launch(cfg, args.devices)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
