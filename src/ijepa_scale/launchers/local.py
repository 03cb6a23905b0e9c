"""Local launcher: one process per listed device, or one process under torchrun.

Signals. SIGINT, SIGTERM and SIGUSR2 ask every rank to stop after its current step at a step
they agree on, save it and exit 0, whichever processes receive them: the launcher alone (it
forwards the signal to the ranks), the whole process group (`kill -TERM -PGID`, `timeout`,
systemd, Ctrl-C in a terminal), or single ranks. Data-loader workers ignore them. Every
signal that arrives within ABORT_AFTER_S of the first one belongs to the same request
(a wrapper such as `timeout` relays a signal to the launcher while the group gets it too);
a second SIGINT or SIGTERM later than that kills the ranks without saving.

Errors. Ranks report their failure to the launcher instead of printing it; the launcher
prints the one that happened first, once: a user mistake as one line (exit 2), a known
failure such as a full disk as one line naming the rank (exit 1), anything else with that
rank's traceback (exit 1). A peer's follow-up error (a broken collective) is not shown.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

from ..distributed import env as dist_utils
from ..config import Config
from ..data.sources import check_local_data
from ..errors import RunFailure, UserError, one_line
from ..procutil import STOP_SIGNALS, die_with_parent, stop_signals_blocked
from .entry import check_logging_folder, cpu_threads_per_rank, run_rank

logger = logging.getLogger(__name__)
USER_ERROR_EXIT = 2
FAILURE_EXIT = 1
ABORT_AFTER_S = 2.0
"""Signals within this many seconds of the first are one stop request; a later SIGINT/SIGTERM aborts."""
KILL_PEERS_AFTER_S = 10.0
"""After a rank failed, the others get this long to exit on their own before they are killed."""


@dataclass(frozen=True)
class Failure:
    """What a rank reports to the launcher when run_rank raises."""

    at: float  # time.time() when the exception left the training code
    rank: int
    kind: str  # "user", "failure" (known cause, one line), "shared" (a failure every rank had) or "crash"
    message: str
    details: str = ""  # the traceback, for a crash


def describe(exc: BaseException, rank: int) -> Failure:
    at = getattr(exc, "failed_at", None) or time.time()
    if isinstance(exc, (UserError, FileNotFoundError)):
        return Failure(at, rank, "user", one_line(exc))
    if isinstance(exc, RunFailure):
        return Failure(at, rank, "shared" if exc.on_every_rank else "failure", one_line(exc))
    first = (str(exc).strip().splitlines() or [""])[0]
    text = "".join(traceback.format_exception(exc))
    return Failure(at, rank, "crash", f"{type(exc).__name__}: {first}", text)


def exit_code(failure: Failure) -> int:
    return USER_ERROR_EXIT if failure.kind == "user" else FAILURE_EXIT


def format_failure(failure: Failure) -> str:
    if failure.kind in ("user", "shared"):
        return f"error: {failure.message}"
    if failure.kind == "failure":
        return f"error: rank {failure.rank}: {failure.message}"
    return f"{failure.details.rstrip()}\nerror: rank {failure.rank} failed first: {failure.message}"


def _spawned_rank(rank: int, cfg: Config, devices: list[str], threads: Optional[int], launcher_pid: int,
                  report) -> None:
    # If the launcher is killed, SIGTERM asks this rank to save at the next step and stop.
    die_with_parent(launcher_pid, signal.SIGTERM)
    try:
        run_rank(cfg, rank, len(devices), devices[rank], local_rank=rank, cpu_threads=threads)
    except BaseException as exc:  # noqa: BLE001 - everything goes to the launcher, which prints it once
        failure = describe(exc, rank)
        report.send(failure)
        report.close()
        # Data workers ignore SIGTERM, which multiprocessing's exit hook would use on them.
        for child in multiprocessing.active_children():
            child.kill()
            child.join(timeout=5)
        sys.exit(exit_code(failure))


def _torchrun_device(devices: list[str] | None, local_rank: int) -> str:
    import torch

    if devices:
        return devices[local_rank % len(devices)]
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _warn_oversubscribed(devices: list[str]) -> None:
    cpu_ranks = sum(1 for d in devices if d == "cpu" or d.startswith("cpu:"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpu_ranks > cores:
        print(f"warning: {cpu_ranks} CPU ranks on {cores} core(s): the ranks share cores and every step waits "
              f"for the slowest; list at most {cores} cpu device(s) in --devices", file=sys.stderr, flush=True)


def launch(cfg: Config, devices: list[str] | None) -> int:
    """Run training on `devices` (or as one torchrun rank); returns the process exit code."""
    env_info = dist_utils.env_rank_info()
    if env_info is not None:
        return _launch_torchrun_rank(cfg, devices, *env_info)

    devices = devices or ["cuda:0"]
    for name in devices:
        dist_utils.parse_device(name)
    cuda = [d for d in devices if d.startswith("cuda")]
    if len(set(cuda)) != len(cuda):
        raise UserError(f"--devices lists a CUDA device twice: {' '.join(devices)}")
    check_logging_folder(cfg.logging.folder)
    check_local_data(cfg.data)
    _warn_oversubscribed(devices)
    threads = cpu_threads_per_rank(len(devices))
    if len(devices) == 1:
        try:
            run_rank(cfg, 0, 1, devices[0], cpu_threads=threads, abort_after_s=ABORT_AFTER_S)
        except RunFailure as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return FAILURE_EXIT
        except KeyboardInterrupt:
            print("aborted by a second interrupt: not saved", file=sys.stderr)
            return 130
        return 0
    return _Ranks(cfg, devices, threads).run()


def _launch_torchrun_rank(cfg: Config, devices: list[str] | None, rank: int, world: int, local_rank: int) -> int:
    device = _torchrun_device(devices if devices else None, local_rank)
    if rank == 0:
        check_logging_folder(cfg.logging.folder)
    try:
        run_rank(cfg, rank, world, device, local_rank=local_rank,
                 cpu_threads=cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    except (UserError, FileNotFoundError) as exc:
        # Every rank runs the same checks; rank 0 speaks for all of them.
        if rank == 0:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    except RunFailure as exc:
        if rank == 0 or not exc.on_every_rank:
            print(f"error: rank {rank}: {one_line(exc)}", file=sys.stderr, flush=True)
        return FAILURE_EXIT
    return 0


class _Ranks:
    """Spawned rank processes, their stop signals and their failures."""

    def __init__(self, cfg: Config, devices: list[str], threads: Optional[int]):
        self.cfg = cfg
        self.devices = devices
        self.threads = threads
        self.processes: list[multiprocessing.Process] = []
        self.first_signal_at: Optional[float] = None
        self.forwarded: set[int] = set()
        self.aborted = False

    # ------------------------------------------------------------------ signals
    def on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self.first_signal_at is None:
            self.first_signal_at = now
            print(f"{signal.Signals(signum).name}: every rank stops after the current step and saves a "
                  f"checkpoint (a second interrupt, {ABORT_AFTER_S:.0f} s or more from now, aborts without saving)",
                  file=sys.stderr, flush=True)
        elif signum in (signal.SIGINT, signal.SIGTERM) and now - self.first_signal_at >= ABORT_AFTER_S:
            if not self.aborted:
                self.aborted = True
                print("second interrupt: killing the ranks without saving", file=sys.stderr, flush=True)
            for process in self.processes:
                if process.is_alive():
                    process.kill()
            return
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        if signum in self.forwarded:
            return  # the ranks already have this request; repeats would add nothing
        self.forwarded.add(signum)
        for process in self.processes:
            if process.pid is not None and process.is_alive():
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(dist_utils.find_free_port())
        context = multiprocessing.get_context("spawn")
        previous = {sig: signal.signal(sig, self.on_signal) for sig in STOP_SIGNALS}
        readers = {}
        try:
            # Blocked while the ranks start, so a signal sent to the group now waits in each rank
            # until its handler is installed (run_rank unblocks them), and reaches this process
            # only once the ranks exist to forward it to.
            with stop_signals_blocked():
                for rank in range(len(self.devices)):
                    reader, writer = context.Pipe(duplex=False)
                    process = context.Process(
                        target=_spawned_rank, name=f"rank{rank}", daemon=False,
                        args=(rank, self.cfg, self.devices, self.threads, os.getpid(), writer),
                    )
                    process.start()
                    writer.close()
                    self.processes.append(process)
                    readers[reader] = rank
            return self._wait(readers)
        finally:
            for process in self.processes:
                if process.is_alive():
                    process.kill()
                process.join()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _wait(self, readers: dict) -> int:
        failures: list[Failure] = []
        deaths: list[Failure] = []
        live = {p.sentinel: (rank, p) for rank, p in enumerate(self.processes)}
        kill_at: Optional[float] = None
        killed_here: set[int] = set()
        while live or readers:
            timeout = 1.0 if kill_at is None else max(0.0, min(1.0, kill_at - time.monotonic()))
            for ready in multiprocessing.connection.wait(list(live) + list(readers), timeout=timeout):
                if ready in readers:
                    rank = readers.pop(ready)
                    try:
                        failures.append(ready.recv())
                    except (EOFError, OSError):
                        pass  # closed without a report: the rank ended normally or was killed
                    ready.close()
                    continue
                rank, process = live.pop(ready)
                process.join()
                code = process.exitcode
                if code != 0 and not any(f.rank == rank for f in failures):
                    deaths.append(Failure(time.time(), rank, "death", self._death_message(rank, code)))
                if code != 0 and kill_at is None:
                    kill_at = time.monotonic() + KILL_PEERS_AFTER_S
            if kill_at is not None and time.monotonic() >= kill_at:
                for rank, process in live.values():
                    killed_here.add(rank)
                    process.kill()
        # A rank that died without a report (killed from outside) and the reported failures compete on
        # time; a rank this launcher killed is a consequence, never the cause.
        deaths = [d for d in deaths if d.rank not in killed_here and not any(f.rank == d.rank for f in failures)]
        reports = failures + deaths
        if self.aborted:
            print("aborted: the ranks were killed without saving; the newest checkpoint is from before the "
                  "interrupt", file=sys.stderr, flush=True)
            return 130
        if not reports:
            return 0
        first = min(reports, key=lambda f: f.at)
        if first.kind == "crash" and any(d.kind == "death" for d in deaths):
            # A rank killed by a signal (the OOM killer) breaks its peers' collectives: their
            # crash reports can race the launcher's notice of the death, so the death wins.
            first = min(deaths, key=lambda f: f.at)
        if first.kind == "death":
            print(f"error: {first.message}; the other ranks were stopped", file=sys.stderr, flush=True)
            return FAILURE_EXIT
        print(format_failure(first), file=sys.stderr, flush=True)
        return exit_code(first)

    @staticmethod
    def _death_message(rank: int, code: int) -> str:
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            return f"rank {rank} was killed by {name}{hint} (exited with code {code})"
        return f"rank {rank} exited with code {code}"
