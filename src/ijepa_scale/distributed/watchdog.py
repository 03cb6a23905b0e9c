"""Hang detection: a run in which no rank completes a step for too long ends loudly and resumably.

Every rank keeps a heartbeat file, `{folder}/heartbeat/rank{R}.json`, with its step and the phase it is in
(`start-up`, `data wait`, `compute`, `collective`, `checkpoint`, `evaluation`), rewritten when either changes. A watchdog
thread in each rank notices when its own rank made no progress for `timeout_s` (a longer allowance before the
first completed step and during the first checkpoint). Since a stopped or lost rank blocks every other rank
in the next collective, every rank that still runs notices at about the same time. Each such rank writes the
Python stacks of all its threads to its log, files a hang report, waits a short grace period for the reports
of the others, and names the ranks that filed none: those stopped making progress, with the step and phase
they last reported. It writes that line to `{folder}/heartbeat/hang.txt` and exits with HANG_EXIT, which
launchers turn into "end every rank, report the line, resume from the last checkpoint".

A lost rank (its process killed, its node or link gone) shows up sooner, as a collective that fails with a
closed connection on the ranks that talked to it. Those ranks take the same path at once (`Watchdog.peer_lost`),
and the others follow within one poll: a rank that gives up leaves `giving-up` in the folder. A rank that
fails with an error of its own files `failed-rank{R}.json` before its connections close, so its peers'
closed connections are taken for what they are (the follow-up of that error), not for a lost rank.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)

HANG_EXIT = 75
"""Exit status of a rank that gave up waiting for progress (EX_TEMPFAIL: trying again may work)."""
HANG_LINE = "hang.txt"
HANG_HISTORY = "hangs.json"
GIVING_UP = "giving-up"
# What gloo and NCCL say in a collective whose peer went away (its process, its host or the link).
PEER_LOST = re.compile(r"connection (closed|reset) by peer|broken pipe|connection refused|remote process exited|"
                       r"communicator was aborted|ncclRemoteError|network error|failed to recv|"
                       r"socket (closed|timed out)", re.IGNORECASE)


def heartbeat_dir(folder: str | os.PathLike) -> Path:
    return Path(folder) / "heartbeat"


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Heartbeat:
    """This rank's progress as a small file other ranks and launchers can read."""

    def __init__(self, folder: str | os.PathLike, rank: int, world_size: int):
        self.dir = heartbeat_dir(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = rank, world_size
        self.path = self.dir / f"rank{rank}.json"
        self.report_path = self.dir / f"hang-rank{rank}.json"
        self.failure_path = self.dir / f"failed-rank{rank}.json"
        self.report_path.unlink(missing_ok=True)
        self.failure_path.unlink(missing_ok=True)
        if rank == 0:  # before any rank can complete a step, so no rank reads the previous run's
            (self.dir / HANG_LINE).unlink(missing_ok=True)
            (self.dir / GIVING_UP).unlink(missing_ok=True)
        self.step, self.phase = None, "start-up"  # the step this process started from is learnt at its first beat
        self.steps_done = 0  # steps completed in this process: the first one gets the start-up allowance
        self.checkpoints_done = 0
        self.changed_at = time.monotonic()
        self._lock = threading.Lock()
        self._write()

    def _record(self) -> dict:
        return {"rank": self.rank, "step": self.step, "phase": self.phase, "host": socket.gethostname(),
                "pid": os.getpid(), "wall_time": time.time()}

    def _write(self) -> None:
        try:
            _write_json(self.path, self._record())
        except OSError as exc:  # a full or flaky disk must not stop training; the watchdog still runs
            logger.debug("heartbeat not written: %s", exc)

    def beat(self, phase: str, step: Optional[int] = None) -> None:
        with self._lock:
            if step is not None and step != self.step:
                self.steps_done += self.step is not None and step > self.step
                self.step = step
            elif phase == self.phase:
                return
            if self.phase == "checkpoint" and phase != "checkpoint":
                self.checkpoints_done += 1
            self.phase = phase
            self.changed_at = time.monotonic()
            self._write()

    def fail(self, error: str) -> None:
        """This rank raised `error`: say so before its connections close, so that its peers do not take their
        broken collectives for a lost rank."""
        try:
            _write_json(self.failure_path, {**self._record(), "error": error})
        except OSError:
            pass

    def idle_s(self) -> float:
        return time.monotonic() - self.changed_at

    def close(self) -> None:
        """The run ended in this process (normally or with an error): drop the file, and the folder once empty."""
        self.phase = "done"
        self.path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass  # other ranks' files, or hang reports kept for the post-mortem


def allowance_s(timeout_s: float, startup_s: float, steps_done: int, phase: str, checkpoints_done: int) -> float:
    """How long a rank may go without progress: start-up, the first step and the first checkpoint get
    `startup_s` (compiling, first shard listing, the first save's directory set-up); the rest `timeout_s`."""
    if steps_done < 1 or (phase == "checkpoint" and checkpoints_done < 1):
        return max(timeout_s, startup_s)
    return timeout_s


def is_peer_lost(exc: BaseException) -> bool:
    """True for a collective's error that says a peer went away (gloo: `Connection closed by peer`, NCCL:
    `remote process exited`); False for anything else, a shape error or a full disk included."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "DistNetworkError" in names:
        return True
    text = str(exc)
    from_collective = bool(names & {"DistError", "DistBackendError"}) or re.search(r"gloo|nccl|c10d", text, re.I)
    return bool(from_collective and PEER_LOST.search(text))


def peer_error_summary(exc: BaseException) -> str:
    """`Connection closed by peer [10.77.0.12]:41234` out of gloo's `[.../pair.cc:553] Connection closed by
    peer [10.77.0.12]:41234. This is typically caused by ...`."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)
    return re.split(r"\.(\s|$)", first, maxsplit=1)[0][:200]


def describe_hang(reports: dict[int, dict], beats: dict[int, dict], world_size: int, waited_s: float,
                  lost: Optional[str] = None, by: Optional[int] = None) -> str:
    """One line naming the ranks that stopped making progress (no hang report) and what the others did;
    with `lost` (what rank `by`'s collective said), the ranks without a report are named as lost."""
    silent = [r for r in range(world_size) if r not in reports]
    steps = [b["step"] for b in beats.values() if b["step"] is not None] or [0]

    def where(rank: int) -> str:
        beat = beats.get(rank)
        if beat is None:
            return f"rank {rank} (never reported)"
        step = "start-up" if beat["step"] is None else f"step {beat['step']}"
        return f"rank {rank} ({step}, {beat['phase']}, {beat['host']} pid {beat['pid']})"

    if lost is not None:
        if silent:
            return (f"{', '.join(where(r) for r in silent)} {'was' if len(silent) == 1 else 'were'} lost: rank {by} "
                    f"saw '{lost}' in a collective")
        return (f"rank {by} saw '{lost}' in a collective at step {max(steps)}, yet every rank is still there: a "
                f"network fault between the ranks")
    if silent:
        waiting = sorted({reports[r]["phase"] for r in reports})
        others = f"; the other ranks waited ({', '.join(waiting)})" if reports else ""
        return (f"no step completed for {waited_s:.0f} s: {', '.join(where(r) for r in silent)} stopped making "
                f"progress{others}")
    phases = sorted({reports[r]["phase"] for r in reports})
    return (f"no step completed for {waited_s:.0f} s: every rank is stuck ({', '.join(phases)}) at step "
            f"{max(steps)}: a deadlock, a lost peer or a hung filesystem")


class Watchdog:
    """A daemon thread that ends this rank (HANG_EXIT) when it makes no progress for too long."""

    def __init__(self, heartbeat: Heartbeat, timeout_s: float, startup_s: float, grace_s: float = 10.0,
                 log_stream=None, exit_fn: Callable[[int], None] = os._exit,
                 on_hang: Optional[Callable[[str], None]] = None):
        self.heartbeat = heartbeat
        self.timeout_s, self.startup_s, self.grace_s = timeout_s, startup_s, grace_s
        self.log_stream = log_stream or sys.stderr
        self.exit_fn = exit_fn
        self.on_hang = on_hang  # called by the one rank that reports the hang, before the silent ranks are killed
        self.poll_s = max(0.05, min(5.0, timeout_s / 20))
        self._stop = threading.Event()
        self._giving_up = threading.Lock()  # the watchdog thread and a lost peer in the main thread: once
        self.thread = threading.Thread(target=self._run, name="ijepa-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def overdue(self) -> bool:
        hb = self.heartbeat
        limit = allowance_s(self.timeout_s, self.startup_s, hb.steps_done, hb.phase, hb.checkpoints_done)
        return hb.phase != "done" and hb.idle_s() > limit

    def peer_given_up(self) -> bool:
        """Another rank gave up (hang or lost peer): this one, which still makes progress, reports too. Only
        after a completed step, when every rank has cleared the previous run's marker."""
        hb = self.heartbeat
        return hb.phase != "done" and hb.steps_done >= 1 and (hb.dir / GIVING_UP).exists()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.overdue():
                self.give_up()
                return
            if self.peer_given_up():  # the first rank's cause, so that whichever rank claims the line says it
                first = _read_json(self.heartbeat.dir / GIVING_UP) or {}
                self.give_up(lost=first.get("lost"), by=first.get("rank"))
                return

    def peer_lost(self, exc: BaseException) -> Optional[dict]:
        """This rank's collective failed because a peer went away (is_peer_lost): name the lost rank(s) and end
        this rank like a hang (on_hang, HANG_EXIT). Returns instead, with the first one's report, when a peer
        filed an error of its own: that error is the cause, and the caller raises this one as its follow-up."""
        deadline = time.monotonic() + min(2.0, self.grace_s)  # its report may trail its closed sockets a little
        while not (failed := self.peer_failures()):
            if time.monotonic() >= deadline:
                self.give_up(lost=peer_error_summary(exc))
                return None
            time.sleep(0.1)
        return min(failed.values(), key=lambda report: report["wall_time"])

    def peer_failures(self) -> dict[int, dict]:
        hb = self.heartbeat
        return {r: rep for r in range(hb.world_size)
                if r != hb.rank and (rep := _read_json(hb.dir / f"failed-rank{r}.json")) is not None}

    def give_up(self, lost: Optional[str] = None, by: Optional[int] = None) -> None:
        if not self._giving_up.acquire(blocking=False):
            while True:  # the other thread is ending this process
                time.sleep(1)
        hb = self.heartbeat
        waited = hb.idle_s()
        if lost is None:
            print(f"rank {hb.rank}: no progress for {waited:.0f} s (step {hb.step}, {hb.phase}); stacks of all "
                  f"threads:", file=self.log_stream, flush=True)
            faulthandler.dump_traceback(file=self.log_stream, all_threads=True)
        else:
            print(f"rank {hb.rank}: a peer was lost at step {hb.step} ({hb.phase}): {lost}", file=self.log_stream,
                  flush=True)
        _write_json(hb.report_path, {**hb._record(), "waited_s": waited})
        by = hb.rank if by is None else by
        if not (hb.dir / GIVING_UP).exists():
            try:
                _write_json(hb.dir / GIVING_UP, {"rank": by, "lost": lost})
            except OSError:
                pass
        reports = self._collect_reports()
        beats = {r: b for r in range(hb.world_size) if (b := _read_json(hb.dir / f"rank{r}.json"))}
        failed = self.peer_failures()
        if failed:  # a rank raised an error: that is the cause, reported by that rank; nothing to resume
            rank, report = min(failed.items())
            print(f"rank {hb.rank}: ended after rank {rank} failed (step {report['step']}, {report['phase']}): "
                  f"{report['error']}", file=self.log_stream, flush=True)
            self.exit_fn(1)
            return
        line = describe_hang(reports, beats, hb.world_size, waited, lost=lost, by=by)
        print(f"rank {hb.rank}: {line}", file=self.log_stream, flush=True)
        logger.error("%s", line)
        if self._claim_report(line):
            self._dump_silent_ranks(reports, beats)
            if self.on_hang is not None:
                try:
                    self.on_hang(line)
                except Exception as exc:  # noqa: BLE001 - the run ends either way
                    print(f"rank {hb.rank}: after the hang: {type(exc).__name__}: {exc}", file=self.log_stream)
            self._kill_silent_ranks(reports, beats)
        self.exit_fn(HANG_EXIT)

    def _claim_report(self, line: str) -> bool:
        """True for the one rank that writes the run's hang line (the first to get there)."""
        try:
            with open(self.heartbeat.dir / HANG_LINE, "x") as f:
                f.write(line + "\n")
            return True
        except OSError:
            return False

    def _collect_reports(self) -> dict[int, dict]:
        """The hang reports filed within the grace period; no waiting for a rank of this host that is gone."""
        hb = self.heartbeat
        deadline = time.monotonic() + self.grace_s
        while True:
            reports = {r: rep for r in range(hb.world_size)
                       if (rep := _read_json(hb.dir / f"hang-rank{r}.json")) is not None}
            beats = {r: b for r in range(hb.world_size) if r not in reports
                     and (b := _read_json(hb.dir / f"rank{r}.json"))}
            awaited = [r for r in range(hb.world_size) if r not in reports and not (
                r in beats and beats[r]["host"] == socket.gethostname() and not _is_rank_process(beats[r]["pid"]))]
            if not awaited or time.monotonic() >= deadline:
                return reports
            time.sleep(min(0.2, self.grace_s / 10 or 0.2))

    @staticmethod
    def _silent_here(reports: dict, beats: dict):
        """(rank, heartbeat) of each rank on this host that filed no hang report."""
        host = socket.gethostname()
        return [(rank, beat) for rank, beat in beats.items() if rank not in reports and beat["host"] == host]

    def _dump_silent_ranks(self, reports: dict, beats: dict) -> None:
        """py-spy's stacks of a silent rank on this host, when py-spy is installed (it reads stopped processes)."""
        spy = shutil.which("py-spy")
        if spy is None:
            return
        for rank, beat in self._silent_here(reports, beats):
            try:
                out = subprocess.run([spy, "dump", "--pid", str(beat["pid"])], capture_output=True, text=True,
                                     timeout=20)
                print(f"py-spy dump of rank {rank} (pid {beat['pid']}):\n{out.stdout}{out.stderr}",
                      file=self.log_stream, flush=True)
            except (OSError, subprocess.TimeoutExpired):
                pass

    def _kill_silent_ranks(self, reports: dict, beats: dict) -> None:
        """SIGKILL the silent ranks on this host: the one signal a stopped process cannot hold off."""
        for rank, beat in self._silent_here(reports, beats):
            try:
                if not _is_rank_process(beat["pid"]):
                    continue  # gone, or the pid is no longer a rank of this run
                os.kill(beat["pid"], signal.SIGKILL)
                print(f"rank {self.heartbeat.rank}: killed rank {rank} (pid {beat['pid']})", file=self.log_stream,
                      flush=True)
            except OSError:
                pass


def _is_rank_process(pid: int) -> bool:
    """A live (not zombie) python process: what a rank's heartbeat pid is while that rank exists."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def read_hang_line(folder: str | os.PathLike) -> Optional[str]:
    try:
        return (heartbeat_dir(folder) / HANG_LINE).read_text().strip() or None
    except OSError:
        return None


def hang_count(folder: str | os.PathLike) -> int:
    """How many hangs this run folder has recorded (should_retry_after_hang records them)."""
    return int((_read_json(heartbeat_dir(folder) / HANG_HISTORY) or {}).get("count", 0))


def should_retry_after_hang(folder: str | os.PathLike, committed_step: Optional[int]) -> bool:
    """Record this hang; False when the previous hang ended at the same committed checkpoint (the run made
    no progress in between, so a restart would hang at the same place again)."""
    path = heartbeat_dir(folder) / HANG_HISTORY
    record = _read_json(path) or {}
    history = record.get("hangs", [])
    again = bool(history) and history[-1].get("committed_step") == committed_step
    history.append({"committed_step": committed_step, "wall_time": time.time()})
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"hangs": history[-20:], "count": int(record.get("count", 0)) + 1})
    return not again
