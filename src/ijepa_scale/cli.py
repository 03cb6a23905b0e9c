"""`ijepa-scale` command line: one subcommand per entry of COMMANDS."""

from __future__ import annotations

import difflib
import importlib
import os
import sys

COMMANDS = {
    "train": ("ijepa_scale.commands.train", "main", "pretrain on local devices (same as main.py)"),
    "slurm": ("ijepa_scale.commands.slurm", "main", "submit pretraining to SLURM (same as main_distributed.py)"),
    "make-shards": ("ijepa_scale.commands.make_shards", "main",
                    "ImageFolder / synset tars / file list -> tar shards + index"),
    "fashion-mnist": ("ijepa_scale.commands.fashion_mnist", "main", "Fashion-MNIST (Debian package) -> tar shards"),
    "bench-masks": ("ijepa_scale.commands.bench_masks", "main", "mask sampler speed (ms per batch)"),
    "bench-data": ("ijepa_scale.commands.bench_data", "main", "input pipeline throughput (img/s)"),
    "bench-step": ("ijepa_scale.commands.bench_step", "main", "training step speed, phase split, MFU, vs official"),
    "bench-energy": ("ijepa_scale.commands.bench_energy", "main", "energy transformer step vs a ViT of the same width"),
    "bench-collapse": ("ijepa_scale.commands.bench_collapse", "main", "cost of the collapse metrics (ms per step)"),
    "plan": ("ijepa_scale.commands.plan", "main", "memory per GPU under DDP/FSDP, with/without checkpointing"),
    "gpu-check": ("ijepa_scale.commands.gpu_check", "main", "check a GPU machine: NCCL, resume, speed, memory, data"),
    "eval": ("ijepa_scale.commands.eval", "main", "eval linear|knn: frozen-feature accuracy of a checkpoint"),
    "analyze": ("ijepa_scale.commands.analyze", "main", "analyze attention|corrdim|umap|gates: PNGs of a checkpoint"),
    "download": ("ijepa_scale.commands.download", "main", "fetch a released checkpoint into the verified cache (--list)"),
    "report": ("ijepa_scale.commands.report", "main", "summary and PNG of a run's per-rank CSVs (also while it runs)"),
    "diff": ("ijepa_scale.commands.diff", "main", "config keys that differ between two runs, checkpoints or YAMLs"),
    "show-masks": ("ijepa_scale.commands.show_masks", "main",
                   "draw the configured context/target blocks over real images"),
    "export": ("ijepa_scale.commands.export", "main", "write weights as a Hugging Face directory or official .pth.tar"),
}


def usage() -> str:
    lines = [f"  {name:<15} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return ("usage: ijepa-scale COMMAND [options]   (ijepa-scale COMMAND --help for its options)\n"
            "       ijepa-scale --version\n\ncommands:\n"
            + "\n".join(lines))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from .version import version_line

        print(version_line())
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], [*COMMANDS, "--version"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown command {argv[0]!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    # A parser without its own prog takes argv[0]: make every usage line read `ijepa-scale SUB`.
    saved, sys.argv[0:1] = sys.argv[0:1], [f"ijepa-scale {argv[0]}"]
    try:
        result = getattr(importlib.import_module(module), function)(argv[1:])
    except KeyboardInterrupt:
        print(f"ijepa-scale {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly as other Unix tools do. stdout is pointed at
        # /dev/null so that flushing it at exit does not raise a second time.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file (captured)
            pass
        return 141
    finally:
        sys.argv[0:1] = saved
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
