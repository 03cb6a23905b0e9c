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
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
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
        self.report_path.unlink(missing_ok=True)
        if rank == 0:
            (self.dir / HANG_LINE).unlink(missing_ok=True)
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


def describe_hang(reports: dict[int, dict], beats: dict[int, dict], world_size: int, waited_s: float) -> str:
    """One line naming the ranks that stopped making progress (no hang report) and what the others did."""
    silent = [r for r in range(world_size) if r not in reports]
    steps = [b["step"] for b in beats.values() if b["step"] is not None] or [0]

    def where(rank: int) -> str:
        beat = beats.get(rank)
        if beat is None:
            return f"rank {rank} (never reported)"
        step = "start-up" if beat["step"] is None else f"step {beat['step']}"
        return f"rank {rank} ({step}, {beat['phase']}, {beat['host']} pid {beat['pid']})"

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

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.overdue():
                self.give_up()
                return

    def give_up(self) -> None:
        hb = self.heartbeat
        waited = hb.idle_s()
        print(f"rank {hb.rank}: no progress for {waited:.0f} s (step {hb.step}, {hb.phase}); stacks of all "
              f"threads:", file=self.log_stream, flush=True)
        faulthandler.dump_traceback(file=self.log_stream, all_threads=True)
        _write_json(hb.report_path, {**hb._record(), "waited_s": waited})
        reports = self._collect_reports()
        beats = {r: b for r in range(hb.world_size) if (b := _read_json(hb.dir / f"rank{r}.json"))}
        line = describe_hang(reports, beats, hb.world_size, waited)
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
        hb = self.heartbeat
        deadline = time.monotonic() + self.grace_s
        while True:
            reports = {r: rep for r in range(hb.world_size)
                       if (rep := _read_json(hb.dir / f"hang-rank{r}.json")) is not None}
            if len(reports) == hb.world_size or time.monotonic() >= deadline:
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
                if b"python" not in Path(f"/proc/{beat['pid']}/cmdline").read_bytes():
                    continue  # the pid is no longer a rank of this run
                os.kill(beat["pid"], signal.SIGKILL)
                print(f"rank {self.heartbeat.rank}: killed rank {rank} (pid {beat['pid']})", file=self.log_stream,
                      flush=True)
            except OSError:
                pass


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
