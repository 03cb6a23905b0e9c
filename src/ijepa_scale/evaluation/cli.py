"""`ijepa-scale eval linear|knn`: frozen-feature evaluation of a checkpoint's encoder on labelled tar shards.

    ijepa-scale eval knn --checkpoint logs/demo_fmnist --train-shards 'data/fmnist/fmnist-train-{000000..000007}.tar' \\
        --val-shards 'data/fmnist/fmnist-test-{000000..000001}.tar' --devices cpu cpu

One rank per listed device (or one rank per process under torchrun). Results print as a table and
are appended to `eval.csv` beside the checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from ..errors import UserError
from .evaluate import KEYS, METHODS
from .features import POOLS

USER_ERROR_EXIT = 2


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
    parser.add_argument("--crop-size", type=int, default=None, help="image size (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=1, help="data workers per rank")
    parser.add_argument("--csv", default=None, help="results CSV (default: eval.csv beside the checkpoint)")
    args = parser.parse_args(argv)
    for name in ("crop_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    return args


def _setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def evaluate_rank(rank: int, world_size: int, device_name: str, args, checkpoint: Path, sources,
                  cpu_threads: int | None = None) -> list[dict]:
    """What one rank does: join the group, evaluate, leave; returns the result rows (the same on every rank)."""
    import torch

    from ..distributed import env as dist_utils
    from .evaluate import run_evaluation

    _setup_logging(rank)
    device = dist_utils.parse_device(device_name)
    if device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    dist_utils.init_distributed(rank, world_size, device)
    try:
        methods = METHODS if args.method == "both" else (args.method,)
        rows = []
        for random_init in ((False, True) if args.random_init else (False,)):
            rows += run_evaluation(checkpoint, args.key, methods, *sources, pool=args.pool, random_init=random_init,
                                   crop_size=args.crop_size, batch_size=args.batch_size,
                                   num_workers=args.num_workers, device=device, rank=rank, world_size=world_size)
        return rows
    finally:
        dist_utils.destroy()


def _spawned(rank, world_size, devices, args, checkpoint, sources, threads, queue, parent_pid):
    from ..procutil import die_with_parent

    die_with_parent(parent_pid)  # evaluation keeps no state worth saving: a killed launcher ends its ranks
    try:
        rows = evaluate_rank(rank, world_size, devices[rank], args, checkpoint, sources, threads)
        if rank == 0:
            queue.put(rows)
    except UserError as exc:
        print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    except Exception:
        print(f"rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.exit(1)


def _run(args, checkpoint: Path, sources) -> list[dict] | None:
    from ..distributed import env as dist_utils

    env_info = dist_utils.env_rank_info()
    if env_info is not None:  # under torchrun: this process is one rank
        rank, world, local_rank = env_info
        import torch

        default = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = args.devices[local_rank % len(args.devices)] if args.devices else default
        rows = evaluate_rank(rank, world, device, args, checkpoint, sources)
        return rows if rank == 0 else None

    devices = args.devices or ["cpu"]
    for name in devices:
        dist_utils.parse_device(name)
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // len(devices))
    if len(devices) == 1:
        return evaluate_rank(0, 1, devices[0], args, checkpoint, sources, threads)

    import torch.multiprocessing as mp

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(dist_utils.find_free_port())
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=_spawned, args=(r, len(devices), devices, args, checkpoint, sources,
                                                        threads, queue, os.getpid()))
                 for r in range(len(devices))]
    for p in processes:
        p.start()
    try:
        # A failed rank would leave the others waiting in a collective: stop them all.
        while any(p.is_alive() for p in processes):
            for p in processes:
                p.join(timeout=0.5)
                if p.exitcode not in (None, 0):
                    for other in processes:
                        if other.is_alive():
                            other.terminate()
                    for other in processes:
                        other.join()
                    if p.exitcode == USER_ERROR_EXIT:
                        raise SystemExit(USER_ERROR_EXIT)
                    raise RuntimeError(f"rank {processes.index(p)} exited with code {p.exitcode}")
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
    return queue.get()


def main(argv=None) -> int:
    from .evaluate import describe_checkpoint, open_eval_shards, resolve_checkpoint
    from .table import append_rows, format_table

    args = parse_args(argv)
    _setup_logging(0)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        describe_checkpoint(checkpoint, args.key)
        sources = (open_eval_shards(args.train_shards, "--train-shards"),
                   open_eval_shards(args.val_shards, "--val-shards"))
        rows = _run(args, checkpoint, sources)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    except SystemExit as exc:
        return int(exc.code or 0)
    except RuntimeError as exc:
        print(f"error: {exc}; the other ranks were stopped", file=sys.stderr)
        return 1
    if rows is None:  # a torchrun rank other than 0
        return 0
    print(format_table(rows))
    path = append_rows(Path(args.csv) if args.csv else checkpoint.parent / "eval.csv", rows)
    print(f"appended {len(rows)} row(s) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
