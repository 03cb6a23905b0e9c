"""Local launcher: one process per listed device, or one process under torchrun."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

import torch.multiprocessing as mp

from .. import distributed as dist_utils
from ..config import Config
from ..errors import UserError
from ..procutil import die_with_parent
from .entry import cpu_threads_per_rank, run_rank

logger = logging.getLogger(__name__)
USER_ERROR_EXIT = 2


def _spawned_rank(rank: int, cfg: Config, devices: list[str], threads: int | None, launcher_pid: int) -> None:
    # If the launcher is killed, SIGTERM asks this rank to save at the next step and stop.
    die_with_parent(launcher_pid, signal.SIGTERM)
    try:
        run_rank(cfg, rank, len(devices), devices[rank], local_rank=rank, cpu_threads=threads)
    except (UserError, FileNotFoundError) as exc:
        # A user mistake found after start-up (missing shard, refused resume): one line, not a traceback.
        print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
    except Exception:
        # Printed here because the launcher may report a peer's follow-up error (a broken
        # collective) first; this keeps the root cause in the output.
        print(f"rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise


def _torchrun_device(devices: list[str] | None, local_rank: int) -> str:
    import torch

    if devices:
        return devices[local_rank % len(devices)]
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def launch(cfg: Config, devices: list[str] | None) -> int:
    """Run training on `devices` (or as one torchrun rank); returns the process exit code."""
    env_info = dist_utils.env_rank_info()
    if env_info is not None:
        rank, world, local_rank = env_info
        device = _torchrun_device(devices if devices else None, local_rank)
        run_rank(cfg, rank, world, device, local_rank=local_rank,
                     cpu_threads=cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        return 0

    devices = devices or ["cuda:0"]
    for name in devices:
        dist_utils.parse_device(name)
    cuda = [d for d in devices if d.startswith("cuda")]
    if len(set(cuda)) != len(cuda):
        raise UserError(f"--devices lists a CUDA device twice: {' '.join(devices)}")
    threads = cpu_threads_per_rank(len(devices))
    if len(devices) == 1:
        run_rank(cfg, 0, 1, devices[0], cpu_threads=threads)
        return 0

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(dist_utils.find_free_port())
    context = mp.start_processes(_spawned_rank, args=(cfg, devices, threads, os.getpid()), nprocs=len(devices),
                                 join=False, start_method="spawn")
    interrupts = 0

    def forward_signal(signum, frame):
        nonlocal interrupts
        interrupts += 1
        for process in context.processes:
            if process.is_alive():
                if interrupts == 1:
                    os.kill(process.pid, signal.SIGINT)
                else:
                    process.kill()
        if interrupts == 1:
            print("stopping after the current step and saving a checkpoint (interrupt again to abort)",
                  file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, forward_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not context.join(timeout=1.0, grace_period=5.0):
            pass
    except mp.ProcessRaisedException as exc:
        print(f"error: rank {exc.error_index} failed; the other ranks were stopped.\n{exc}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as exc:
        if exc.exit_code == USER_ERROR_EXIT:
            return USER_ERROR_EXIT  # the rank printed the one-line message
        print(f"error: rank {exc.error_index} exited with code {exc.exit_code}; the other ranks were stopped.",
              file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
