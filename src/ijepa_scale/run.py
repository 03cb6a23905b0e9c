"""What one training process does: join the group, build the trainer, train, clean up."""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch

from . import distributed as dist_utils
from .config import Config


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def run_training(cfg: Config, rank: int, world_size: int, device_name: str, local_rank: int | None = None,
                 cpu_threads: int | None = None) -> bool:
    """Train in this process; returns True when all epochs are done, False when stopped by a signal."""
    from .trainer import Trainer

    setup_logging(rank)
    # Stop requests that arrive while the trainer is being built are kept, not lost: the first
    # step then agrees on them across ranks, saves, and stops.
    pending: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    device = dist_utils.parse_device(device_name)
    if device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    env = dist_utils.init_distributed(rank, world_size, device, local_rank)
    trainer = None
    try:
        trainer = Trainer(cfg, env)
        trainer.stop_requested = bool(pending)
        for sig in STOP_SIGNALS:
            signal.signal(sig, trainer.request_stop)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        dist_utils.destroy()


def cpu_threads_per_rank(ranks_on_host: int) -> int | None:
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // ranks_on_host)
