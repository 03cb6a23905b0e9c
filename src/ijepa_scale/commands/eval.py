"""`ijepa-scale eval linear|knn`: frozen-feature evaluation of a checkpoint's encoder on labelled tar shards.

    ijepa-scale eval knn --checkpoint logs/demo_fmnist --train-shards 'data/fmnist/fmnist-train-{000000..000007}.tar' \\
        --val-shards 'data/fmnist/fmnist-test-{000000..000001}.tar' --devices cpu cpu

One rank per listed device (or one rank per process under torchrun). `--shots 1,10,100` adds few-shot
rows, `--baselines` rows for the raw pixels and random weights. Results print as a table and are
appended to `eval.csv` beside the checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from ..errors import UserError, one_line
from ..evaluation.evaluate import DEFAULT_SEEDS, KEYS, METHODS
from ..evaluation.features import POOLS

USER_ERROR_EXIT = 2


def shot_list(text: str) -> tuple[int, ...]:
    """'1,10,100' -> (1, 10, 100): positive, each once, in order."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected labelled images per class as N[,N...], e.g. 1,10,100; "
                                         f"got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"every N must be > 0, got {text!r}")
    return tuple(sorted(set(values)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="ijepa-scale eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=METHODS + ("both",), help="linear probe, k-NN, or both")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file or URL (ours or official .pth.tar), or a run folder (its *-latest)")
    parser.add_argument("--train-shards", required=True, help="labelled tar shards (brace pattern) to fit on")
    parser.add_argument("--val-shards", required=True, help="labelled tar shards to score")
    parser.add_argument("--key", choices=KEYS, default="target_encoder", help="which encoder (default target_encoder)")
    parser.add_argument("--pool", choices=POOLS, default="mean",
                        help="mean: average of the last layer's tokens; last4: the last 4 blocks' means, concatenated")
    parser.add_argument("--devices", nargs="+", default=None, help="one rank per device, e.g. cpu cpu (default cpu)")
    parser.add_argument("--random-init", action="store_true",
                        help="also evaluate the same architecture with random weights (a reference row)")
    parser.add_argument("--baselines", action="store_true",
                        help="reference rows under the same protocols: the raw pixels and the same architecture "
                             "with random weights (implies --random-init)")
    parser.add_argument("--shots", type=shot_list, default=(), metavar="N[,N...]",
                        help="also fit on N labelled images per class, e.g. 1,10,100 (mean and std over --seeds draws)")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                        help=f"few-shot draws per N (default {DEFAULT_SEEDS})")
    parser.add_argument("--crop-size", type=int, default=None, help="image size (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=1, help="data workers per rank")
    parser.add_argument("--csv", default=None, help="results CSV (default: eval.csv beside the checkpoint)")
    args = parser.parse_args(argv)
    for name in ("crop_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.seeds <= 0:
        parser.error(f"--seeds must be > 0, got {args.seeds}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    return args


def evaluate_rank(rank: int, world_size: int, device_name: str, *, local_rank: int, cpu_threads: int | None,
                  abort_after_s: float | None = None, args, checkpoint: Path, sources) -> list[dict]:
    """What one rank does: join the group, evaluate, leave; returns the result rows (the same on every rank)."""
    import torch

    from ..distributed import env as dist_utils
    from ..launchers.entry import setup_logging
    from ..evaluation.evaluate import run_evaluation

    setup_logging(rank, rank0_to_stderr=True)
    device = dist_utils.parse_device(device_name)
    if device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    dist_utils.init_distributed(rank, world_size, device, local_rank)
    with dist_utils.leave_group_after():
        methods = METHODS if args.method == "both" else (args.method,)
        return run_evaluation(checkpoint, args.key, methods, *sources, pool=args.pool,
                              random_init=args.random_init or args.baselines, raw_pixels=args.baselines,
                              shots=args.shots, seeds=args.seeds, crop_size=args.crop_size,
                              batch_size=args.batch_size, num_workers=args.num_workers, device=device, rank=rank,
                              world_size=world_size)


def main(argv=None) -> int:
    from ..evaluation.evaluate import describe_checkpoint, open_eval_shards, resolve_checkpoint
    from ..evaluation.table import append_rows, format_table
    from ..launchers.entry import setup_logging
    from ..launchers.local import run_ranks

    args = parse_args(argv)
    setup_logging(0, rank0_to_stderr=True)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        describe_checkpoint(checkpoint, args.key)
        sources = (open_eval_shards(args.train_shards, "--train-shards"),
                   open_eval_shards(args.val_shards, "--val-shards"))
        rank_main = functools.partial(evaluate_rank, args=args, checkpoint=checkpoint, sources=sources)
        code, rows = run_ranks(rank_main, args.devices, default_device="cpu", saves_on_stop=False)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT
    if code != 0 or rows is None:  # a failure (printed), or a torchrun rank other than 0
        return code
    print(format_table(rows))
    path = append_rows(Path(args.csv) if args.csv else checkpoint.parent / "eval.csv", rows)
    print(f"appended {len(rows)} row(s) to {path}")
    return 0

