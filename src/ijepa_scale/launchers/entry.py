"""What one training process does: join the group, build the trainer, train, clean up.

Every launcher calls :func:`run_rank` once in each training process: the local launcher in
its spawned ranks (or in-process for one device), torchrun ranks through `main.py`, and the
SLURM launcher in each submitit task.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..distributed import env as dist_utils
from ..distributed.watchdog import Heartbeat, Watchdog, is_peer_lost
from ..config import Config
from ..errors import UserError, one_line
from ..procutil import STOP_SIGNALS, unblock_stop_signals

logger = logging.getLogger("ijepa_scale")


@dataclass(frozen=True)
class RunResult:
    """How a rank's run ended; the same on every rank.

    - `completed`: all `optimization.epochs` are done (now or by an earlier run).
    - `stop_reason`: None when completed, else "signal" (a stop signal reached some rank) or
      "stop_at_step" (`optimization.stop_at_step` was reached).
    - `signals`: names of the stop signals that any rank had received when the ranks agreed
      to stop, e.g. ("SIGUSR2",); empty unless stop_reason == "signal".
    - `step`: the global step the run ended at (the agreed stop step when stopped).
    - `checkpoint`: the file holding the state of exactly `step` (`{tag}-latest.pth.tar`, or a
      `.dcp` folder under distributed.parallel=fsdp), committed (written, fsynced, renamed) by rank 0
      before any rank returns; None when no checkpoint of `step` exists. A stop requested before
      the first step is honoured after that step (so `step` >= 1 for a fresh run).
    - `previous_handlers`: the signal handlers that were installed before run_rank (e.g.
      submitit's USR2 handler), keyed by signal number. run_rank restores them on return.
    """

    completed: bool
    step: int
    stop_reason: Optional[str] = None
    signals: tuple[str, ...] = ()
    checkpoint: Optional[Path] = None
    previous_handlers: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)


def setup_logging(rank: int, log_file: Optional[Path] = None, rank0_to_stderr: bool = False) -> None:
    """Rank 0 logs INFO to stdout (stderr with `rank0_to_stderr`, for a command whose stdout is its
    result), others WARNING to stderr; rank 0 also appends to `log_file`, created at its first line."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stdout if rank == 0 and not rank0_to_stderr else sys.stderr)
    formatter = logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handler.setFormatter(formatter)
    handlers: list[logging.Handler] = [handler]
    if rank == 0 and log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            to_file = logging.FileHandler(log_file, mode="a", delay=True)
            to_file.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(message)s",
                                                   "%Y-%m-%d %H:%M:%S"))
            handlers.append(to_file)
        except OSError as exc:  # an unwritable folder is reported by the trainer with its own message
            print(f"warning: cannot write the log file {log_file}: {exc}", file=sys.stderr)
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, logging.FileHandler):
            old.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def log_file(cfg: Config) -> Path:
    return Path(cfg.logging.folder) / f"{cfg.logging.write_tag}_r0.log"


def run_rank(cfg: Config, rank: int, world_size: int, device_name: str, *, local_rank: Optional[int] = None,
             cpu_threads: Optional[int] = None, on_stop: Optional[Callable[[RunResult], None]] = None,
             abort_after_s: Optional[float] = None, on_hang: Optional[Callable[[str], None]] = None) -> RunResult:
    """Train in this process as `rank` of `world_size`; returns how the run ended.

    SIGINT, SIGTERM and SIGUSR2 are handled while this runs: any number of them, on any
    rank, make every rank finish its current step, agree on that step in the step's
    all-reduce, commit a checkpoint of it and return a RunResult with stop_reason "signal".
    Repeated signals are one request; this function never aborts on its own (a launcher
    decides that). The handlers found on entry are restored before returning and are
    also in `RunResult.previous_handlers`, so a caller can chain to one after the save,
    e.g. submitit's requeue: `result.previous_handlers[signal.SIGUSR2](signal.SIGUSR2, None)`.

    `on_stop(result)`, if given, is called on every rank when the run stopped early, after
    the checkpoint is committed and all ranks passed the barrier that follows the save, while
    the process group is still up.

    `abort_after_s` (for a process that is its own launcher, e.g. one local device): a second
    SIGINT or SIGTERM at least that many seconds after the first raises KeyboardInterrupt.

    A watchdog (distributed.hang_timeout_s) ends this process with HANG_EXIT when it completes no step
    for too long, after logging its stacks, or when a collective fails because a peer was lost (its process
    killed, its node or link gone); the first rank to report it calls `on_hang(line)` (the SLURM launcher
    requeues the job there) and SIGKILLs the silent ranks on its host. A rank that raises anything else
    files that error first, so its peers' broken collectives are not taken for a lost rank.

    Errors propagate: UserError (the user's mistake, one line, exit 2), RunFailure (a known
    failure such as a full disk, one line, exit 1), anything else (exit 1). The exception
    carries `failed_at` (time.time() when it left the training code, before the clean-up),
    which a launcher uses to tell the rank that failed first from its peers' follow-up errors.
    """
    from ..training.trainer import Trainer

    setup_logging(rank, log_file(cfg))
    # Stop requests that arrive while the trainer is being built are kept, not lost: the
    # ranks agree on them in the first step's all-reduce, then save that step and stop.
    pending: list[int] = []
    trainer: Optional[Trainer] = None
    heartbeat: Optional[Heartbeat] = None
    watchdog: Optional[Watchdog] = None
    first_at: list[float] = []

    def on_signal(signum, frame):
        now = time.monotonic()
        if (abort_after_s is not None and first_at and signum in (signal.SIGINT, signal.SIGTERM)
                and now - first_at[0] >= abort_after_s):
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted without saving")
        if not first_at:
            first_at.append(now)
        if trainer is None:
            pending.append(signum)
        else:
            trainer.request_stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    unblock_stop_signals()  # a launcher may have blocked them until this handler was in place
    try:
        device = dist_utils.parse_device(device_name)
        if device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        heartbeat = Heartbeat(cfg.logging.folder, rank, world_size)
        if cfg.distributed.hang_timeout_s:
            timeout = cfg.distributed.hang_timeout_s
            watchdog = Watchdog(heartbeat, timeout, cfg.distributed.startup_timeout_s, grace_s=min(10.0, timeout / 2),
                                on_hang=on_hang).start()
        env = dist_utils.init_distributed(rank, world_size, device, local_rank,
                                          timeout_s=cfg.distributed.collective_timeout_s)
        left_together = False  # every rank returned from train(): they pass a barrier before leaving the group
        try:
            trainer = Trainer(cfg, env, heartbeat=heartbeat)
            for signum in pending:
                trainer.request_stop(signum)
            completed = trainer.train()
            left_together = True
            result = RunResult(
                completed=completed,
                step=trainer.step,
                stop_reason=None if completed else ("signal" if trainer.stop_agreed else "stop_at_step"),
                signals=tuple(trainer.agreed_signals),
                checkpoint=trainer.checkpoint_of_step(),
                previous_handlers=dict(previous),
            )
            if not completed and on_stop is not None:
                on_stop(result)
            return result
        except BaseException as exc:
            if getattr(exc, "failed_at", None) is None:
                try:
                    exc.failed_at = time.time()
                except AttributeError:
                    pass
            if watchdog is not None and is_peer_lost(exc):
                # Ends this process (HANG_EXIT), unless a peer failed with an error first: then that is the cause.
                first = watchdog.peer_lost(exc)
                try:
                    exc.peer_failure = first
                except AttributeError:
                    pass
            heartbeat.fail(f"{type(exc).__name__}: {one_line(exc)[:300]}")
            raise
        finally:
            if trainer is not None:
                trainer.close()
            dist_utils.destroy(synchronize=left_together)
    finally:
        if watchdog is not None:
            watchdog.stop()
        if heartbeat is not None:
            heartbeat.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def check_logging_folder(folder: str) -> list[Path]:
    """Create `folder` if needed and prove it writable, before any rank starts (UserError otherwise).
    Returns the folders this created, outermost first."""
    if not str(folder).strip():
        raise UserError("logging.folder is empty: set it to the run's output folder (logging.folder=logs/my_run)")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError(f"logging.folder={folder}: exists and is not a folder; choose another logging.folder")
    created = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        remove_if_left_empty(created)
        raise UserError(f"logging.folder={folder}: cannot create or write there ({reason}); "
                        f"choose a writable logging.folder") from None
    return created


def remove_if_left_empty(created: list[Path], log_file: Optional[Path] = None) -> None:
    """Undo check_logging_folder after a run that failed to start: `log_file` (the start-up's log) and the
    folders it created go, unless something else was written there."""
    if log_file is not None and created and log_file.parent == created[-1] and log_file.is_file():
        if [p.name for p in log_file.parent.iterdir()] == [log_file.name]:
            log_file.unlink()
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): keep it and the folders above it


def cpu_threads_per_rank(ranks_on_host: int) -> Optional[int]:
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // ranks_on_host)
