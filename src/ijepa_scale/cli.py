"""`ijepa-scale` command line: one subcommand per entry of COMMANDS."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

COMMANDS = {
    "train": ("ijepa_scale.cli", "train_main", "pretrain on local devices (same as main.py)"),
    "make-shards": ("ijepa_scale.data.make_shards", "main", "ImageFolder / synset tars / file list -> tar shards + index"),
    "fashion-mnist": ("ijepa_scale.data.fashion_mnist", "main", "Fashion-MNIST (Debian package) -> tar shards"),
    "bench-masks": ("ijepa_scale.benchmarks.masks", "main", "mask sampler speed (ms per batch)"),
    "bench-data": ("ijepa_scale.benchmarks.data", "main", "input pipeline throughput (img/s)"),
    "bench-step": ("ijepa_scale.benchmarks.step", "main", "training step speed, phase split, MFU, vs official"),
    "plan": ("ijepa_scale.benchmarks.plan", "main", "memory per GPU under DDP/FSDP, with/without checkpointing"),
    "eval": ("ijepa_scale.evaluation.cli", "main", "eval linear|knn: frozen-feature accuracy of a checkpoint"),
    "analyze": ("ijepa_scale.evaluation.analyze", "main", "analyze attention|corrdim|umap|gates: PNGs of a checkpoint"),
    "download": ("ijepa_scale.commands.download", "main", "fetch a released checkpoint into the verified cache (--list)"),
    "report": ("ijepa_scale.run_report", "main", "summary and PNG of a run's per-rank CSVs (also while it runs)"),
    "show-masks": ("ijepa_scale.masks.show", "main", "draw the configured context/target blocks over real images"),
    "export": ("ijepa_scale.commands.export", "main", "write weights as a Hugging Face directory or official .pth.tar"),
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


def usage() -> str:
    lines = [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return ("usage: ijepa-scale COMMAND [options]   (ijepa-scale COMMAND --help for its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown command {argv[0]!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    # A parser without its own prog takes argv[0]: make every usage line read `ijepa-scale SUB`.
    saved, sys.argv[0:1] = sys.argv[0:1], [f"ijepa-scale {argv[0]}"]
    try:
        result = getattr(importlib.import_module(module), function)(argv[1:])
    finally:
        sys.argv[0:1] = saved
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
