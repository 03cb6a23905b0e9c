"""`ijepa-scale` command line: train, make-shards, fashion-mnist, bench-masks, bench-data, eval."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("ijepa_scale.cli", "train_main", "pretrain on local devices (same as main.py)"),
    "make-shards": ("ijepa_scale.data.make_shards", "main", "ImageFolder / synset tars / file list -> tar shards + index"),
    "fashion-mnist": ("ijepa_scale.data.fashion_mnist", "main", "Fashion-MNIST (Debian package) -> tar shards"),
    "bench-masks": ("ijepa_scale.benchmarks.masks", "main", "mask sampler speed (ms per batch)"),
    "bench-data": ("ijepa_scale.benchmarks.data", "main", "input pipeline throughput (img/s)"),
    "eval": ("ijepa_scale.evaluation.cli", "main", "eval linear|knn: frozen-feature accuracy of a checkpoint"),
}


def parse_train_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description="I-JEPA pretraining on local devices")
    parser.add_argument("--fname", type=str, default="configs.yaml", help="YAML config file")
    parser.add_argument("--devices", type=str, nargs="+", default=None,
                        help="one rank per device, e.g. cuda:0 cuda:1 or cpu cpu (default cuda:0)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as optimization.epochs=2")
    args = parser.parse_args(argv)
    if args.devices:
        # `--devices cpu cpu data.batch_size=8`: argparse hands the overrides to --devices.
        args.overrides = [d for d in args.devices if "=" in d] + args.overrides
        args.devices = [d for d in args.devices if "=" not in d]
    return args


def train_main(argv=None, prog=None) -> int:
    from .config import load_config
    from .errors import UserError, one_line
    from .launchers.local import launch

    args = parse_train_args(argv, prog)
    try:
        cfg = load_config(args.fname, args.overrides)
        return launch(cfg, args.devices)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: ijepa-scale COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, function, _ = COMMANDS[argv[0]]
    result = getattr(importlib.import_module(module), function)(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
