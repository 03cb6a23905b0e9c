"""Local launcher: one process per listed device, or one process under torchrun. `run_ranks` runs any
per-rank work this way (training through `launch`, `ijepa-scale eval`); what follows is training's.

Signals. SIGINT, SIGTERM and SIGUSR2 ask every rank to stop after its current step at a step
they agree on, save it and exit 0, whichever processes receive them: the launcher alone (it
forwards the signal to the ranks), the whole process group (`kill -TERM -PGID`, `timeout`,
systemd, Ctrl-C in a terminal), or single ranks. Data-loader workers ignore them. Every
signal that arrives within ABORT_AFTER_S of the first one belongs to the same request
(a wrapper such as `timeout` relays a signal to the launcher while the group gets it too);
a second SIGINT or SIGTERM later than that kills the ranks without saving. Once the request
is honoured, its repeats are ignored: they never kill a rank that is saving or exiting. (Work
that does not save, such as evaluation, is killed by the first stop signal.)

Errors. Ranks report their failure to the launcher instead of printing it; the launcher
prints the one that happened first, once: a user mistake as one line (exit 2), a known
failure such as a full disk as one line naming the rank (exit 1), anything else with that
rank's traceback (exit 1). A peer's follow-up error (a broken collective) is not shown.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..distributed import env as dist_utils
from ..distributed.watchdog import HANG_EXIT, read_hang_line
from ..config import Config
from ..data.sources import check_local_data
from ..errors import RunFailure, UserError, one_line
from ..procutil import STOP_SIGNALS, die_with_parent, stop_signals_blocked
from .entry import check_logging_folder, cpu_threads_per_rank, log_file, remove_if_left_empty, run_rank

logger = logging.getLogger(__name__)
USER_ERROR_EXIT = 2
FAILURE_EXIT = 1
ABORT_AFTER_S = 2.0
"""Signals within this many seconds of the first are one stop request; a later SIGINT/SIGTERM aborts."""
KILL_PEERS_AFTER_S = 10.0
"""After a rank failed, the others get this long to exit on their own before they are killed."""
KILL_HUNG_AFTER_S = 2.0
"""After a rank's watchdog ended it (HANG_EXIT), the ranks still there get this long before SIGKILL."""


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


RankMain = Callable[..., Any]
"""`rank_main(rank, world_size, device_name, *, local_rank, cpu_threads, abort_after_s)`: one rank's work; what
rank 0 returns is the launcher's result. Spawned ranks need it picklable (a module-level function or a partial)."""


@dataclass(frozen=True)
class _Result:
    value: Any


def _spawned_rank(rank: int, rank_main: RankMain, devices: list[str], threads: Optional[int], launcher_pid: int,
                  saves_on_stop: bool, report) -> None:
    # Stop signals are the launcher's business: the work may handle them (run_rank does, while it
    # runs); outside of that they must not kill a rank that is saving or exiting. A no-op handler, not
    # SIG_IGN, until the work has begun: SIG_IGN would discard a signal pending since start-up.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _no_op)
    # If the launcher is killed, a rank that saves on stop is asked to save; any other rank just dies.
    die_with_parent(launcher_pid, signal.SIGTERM if saves_on_stop else signal.SIGKILL)
    try:
        value = rank_main(rank, len(devices), devices[rank], local_rank=rank, cpu_threads=threads)
    except BaseException as exc:  # noqa: BLE001 - everything goes to the launcher, which prints it once
        failure = describe(exc, rank)
        report.send(failure)
        report.close()
        # Data workers ignore SIGTERM, which multiprocessing's exit hook would use on them.
        for child in multiprocessing.active_children():
            child.kill()
            child.join(timeout=5)
        sys.exit(exit_code(failure))
    _ignore_stop_signals()
    if rank == 0:
        report.send(_Result(value))
    report.close()


def _no_op(signum, frame) -> None:
    pass


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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


def run_ranks(rank_main: RankMain, devices: list[str] | None, *, default_device: str = "cuda:0",
              saves_on_stop: bool = True, before: Optional[Callable[[], None]] = None,
              device_flag: str = "--devices") -> tuple[int, Any]:
    """Run `rank_main` once per device (one process each; in this process for one device) or, under
    torchrun, once as this process's rank. Returns (exit code, what rank 0 returned; None elsewhere).

    `before()` runs once before any rank starts (under torchrun: on rank 0). `saves_on_stop`: the work
    stops cleanly on SIGINT/SIGTERM/SIGUSR2 (run_rank); otherwise the first stop signal kills the ranks.
    User errors (UserError, FileNotFoundError) raised before the ranks start propagate; `device_flag` is the
    option that gave the devices, named in their errors.
    """
    env_info = dist_utils.env_rank_info()
    if env_info is not None:
        return _torchrun_rank(rank_main, devices, *env_info, before=before)

    devices = devices or [default_device]
    for name in devices:
        dist_utils.parse_device(name, flag=device_flag)
    cuda = [d for d in devices if d.startswith("cuda")]
    if len(set(cuda)) != len(cuda):
        raise UserError(f"{device_flag} lists a CUDA device twice: {' '.join(devices)}")
    if before is not None:
        before()
    _warn_oversubscribed(devices)
    threads = cpu_threads_per_rank(len(devices))
    if len(devices) == 1:
        try:
            value = rank_main(0, 1, devices[0], local_rank=0, cpu_threads=threads,
                              abort_after_s=ABORT_AFTER_S if saves_on_stop else None)
        except RunFailure as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return FAILURE_EXIT, None
        except KeyboardInterrupt:
            print("aborted by a second interrupt: not saved" if saves_on_stop else "interrupted", file=sys.stderr)
            return 130, None
        return 0, value
    return _Ranks(rank_main, devices, threads, saves_on_stop).run()


def _torchrun_rank(rank_main: RankMain, devices: list[str] | None, rank: int, world: int, local_rank: int, *,
                   before: Optional[Callable[[], None]]) -> tuple[int, Any]:
    device = _torchrun_device(devices if devices else None, local_rank)
    if rank == 0 and before is not None:
        before()
    try:
        value = rank_main(rank, world, device, local_rank=local_rank,
                          cpu_threads=cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    except (UserError, FileNotFoundError) as exc:
        # Every rank runs the same checks; rank 0 speaks for all of them.
        if rank == 0:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT, None
    except RunFailure as exc:
        if rank == 0 or not exc.on_every_rank:
            print(f"error: rank {rank}: {one_line(exc)}", file=sys.stderr, flush=True)
        return FAILURE_EXIT, None
    return 0, value if rank == 0 else None


def train_rank(cfg: Config, rank: int, world_size: int, device_name: str, *, local_rank: int,
               cpu_threads: Optional[int], abort_after_s: Optional[float] = None) -> None:
    result = run_rank(cfg, rank, world_size, device_name, local_rank=local_rank, cpu_threads=cpu_threads,
                      abort_after_s=abort_after_s)
    if result.stop_reason == "signal":
        # The request is honoured: its repeats (e.g. a second Ctrl-C) must not kill a process about to exit 0.
        _ignore_stop_signals()


def launch(cfg: Config, devices: list[str] | None) -> int:
    """Train on `devices` (or as one torchrun rank); returns the process exit code."""
    created = []

    def before() -> None:
        created.extend(check_logging_folder(cfg.logging.folder))
        check_local_data(cfg.data)

    try:
        code, _ = run_ranks(functools.partial(train_rank, cfg), devices, before=before)
    except (UserError, FileNotFoundError):
        remove_if_left_empty(created, log_file(cfg))
        raise
    if code == USER_ERROR_EXIT:
        remove_if_left_empty(created, log_file(cfg))
    elif code == HANG_EXIT:  # a hang, or a lost rank (named in the line)
        line = read_hang_line(cfg.logging.folder) or "a rank stopped making progress or was lost"
        print(f"error: {line}; every rank was ended and the newest checkpoint is kept: run the same command to "
              f"resume (distributed.hang_timeout_s={cfg.distributed.hang_timeout_s:g})", file=sys.stderr, flush=True)
    return code


class _Ranks:
    """Spawned rank processes, their stop signals and their failures."""

    def __init__(self, rank_main: RankMain, devices: list[str], threads: Optional[int], saves_on_stop: bool = True):
        self.rank_main = rank_main
        self.devices = devices
        self.threads = threads
        self.saves_on_stop = saves_on_stop
        self.processes: list[multiprocessing.Process] = []
        self.first_signal_at: Optional[float] = None
        self.forwarded: set[int] = set()
        self.aborted = False

    # ------------------------------------------------------------------ signals
    def on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.saves_on_stop:
            if not self.aborted:
                self.aborted = True
                print(f"{signal.Signals(signum).name}: stopping the ranks", file=sys.stderr, flush=True)
            self._kill_all()
            return
        if self.first_signal_at is None:
            self.first_signal_at = now
            print(f"{signal.Signals(signum).name}: every rank stops after the current step and saves a "
                  f"checkpoint (a second interrupt, {ABORT_AFTER_S:.0f} s or more from now, aborts without saving)",
                  file=sys.stderr, flush=True)
        elif signum in (signal.SIGINT, signal.SIGTERM) and now - self.first_signal_at >= ABORT_AFTER_S:
            if not self.aborted:
                self.aborted = True
                print("second interrupt: killing the ranks without saving", file=sys.stderr, flush=True)
            self._kill_all()
            return
        self._forward(signum)

    def _kill_all(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()

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
    def run(self) -> tuple[int, Any]:
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
                        args=(rank, self.rank_main, self.devices, self.threads, os.getpid(), self.saves_on_stop,
                              writer),
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
                # After a stop request the process is about to exit 0: repeats of the request are ignored.
                stopped = self.first_signal_at is not None and not self.aborted
                signal.signal(sig, signal.SIG_IGN if stopped else handler)

    def _wait(self, readers: dict) -> tuple[int, Any]:
        failures: list[Failure] = []
        result: Optional[_Result] = None
        deaths: list[Failure] = []
        live = {p.sentinel: (rank, p) for rank, p in enumerate(self.processes)}
        kill_at: Optional[float] = None
        killed_here: set[int] = set()
        hung = False
        while live or readers:
            timeout = 1.0 if kill_at is None else max(0.0, min(1.0, kill_at - time.monotonic()))
            for ready in multiprocessing.connection.wait(list(live) + list(readers), timeout=timeout):
                if ready in readers:
                    rank = readers.pop(ready)
                    try:
                        message = ready.recv()
                    except (EOFError, OSError):
                        message = None  # closed without a report: the rank was killed
                    if isinstance(message, Failure):
                        failures.append(message)
                    elif isinstance(message, _Result):
                        result = message
                    ready.close()
                    continue
                rank, process = live.pop(ready)
                process.join()
                code = process.exitcode
                if code == HANG_EXIT:
                    # The watchdogs gave up together; what is left is stuck (stopped, or in a dead collective).
                    hung = True
                    kill_at = min(kill_at or math.inf, time.monotonic() + KILL_HUNG_AFTER_S)
                    continue
                if code != 0 and not any(f.rank == rank for f in failures):
                    deaths.append(Failure(time.time(), rank, "death", self._death_message(rank, code)))
                if code != 0 and kill_at is None:
                    kill_at = time.monotonic() + KILL_PEERS_AFTER_S
            if kill_at is not None and time.monotonic() >= kill_at:
                for rank, process in live.values():
                    killed_here.add(rank)
                    process.kill()
        if hung and not self.aborted:
            # launch() prints the watchdogs' line; a rank killed from outside is named here as what it is.
            for death in deaths:
                if death.rank not in killed_here:
                    print(f"note: {death.message}", file=sys.stderr, flush=True)
            return HANG_EXIT, None
        # A rank that died without a report (killed from outside) and the reported failures compete on
        # time; a rank this launcher killed is a consequence, never the cause.
        deaths = [d for d in deaths if d.rank not in killed_here and not any(f.rank == d.rank for f in failures)]
        reports = failures + deaths
        if self.aborted:
            if self.saves_on_stop:
                print("aborted: the ranks were killed without saving; the newest checkpoint is from before the "
                      "interrupt", file=sys.stderr, flush=True)
            return 130, None
        if not reports:
            if result is None:  # every rank exited 0, yet rank 0 sent nothing: not expected
                print("error: rank 0 ended without reporting its result", file=sys.stderr, flush=True)
                return FAILURE_EXIT, None
            return 0, result.value
        first = min(reports, key=lambda f: f.at)
        if first.kind == "crash" and any(d.kind == "death" for d in deaths):
            # A rank killed by a signal (the OOM killer) breaks its peers' collectives: their
            # crash reports can race the launcher's notice of the death, so the death wins.
            first = min(deaths, key=lambda f: f.at)
        if first.kind == "death":
            resume = "; the newest checkpoint is kept: run the same command to resume" if self.saves_on_stop else ""
            print(f"error: {first.message}; the other ranks were stopped{resume}", file=sys.stderr, flush=True)
            return FAILURE_EXIT, None
        print(format_failure(first), file=sys.stderr, flush=True)
        return exit_code(first), None

    @staticmethod
    def _death_message(rank: int, code: int) -> str:
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            return f"rank {rank} was lost: killed by {name}{hint} (exited with code {code})"
        return f"rank {rank} exited with code {code}"
