"""Process hygiene: children that do not outlive the process they work for."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (no-op elsewhere).

    A rank killed by the OOM killer or SIGKILL cannot shut its data workers down;
    without this they would keep running, holding memory and the job's pipes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
"""Signals that ask a run to save at the agreed step and stop (SIGUSR2: SLURM's warning signal)."""


def block_stop_signals() -> None:
    """Hold STOP_SIGNALS pending in this thread (and in children forked or spawned from it)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def unblock_stop_signals() -> None:
    """Deliver STOP_SIGNALS held pending by block_stop_signals (in this process or a parent)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the first spawn would) so that it survives a
    SIGUSR2 to the process group: it ignores SIGINT/SIGTERM itself but would die of SIGUSR2,
    so it inherits SIGUSR2 blocked. Starting it unblocks SIGINT and SIGTERM in this thread,
    which is why this must not run inside stop_signals_blocked."""
    from multiprocessing import resource_tracker

    was_blocked = signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
    try:
        resource_tracker.ensure_running()
    finally:
        if not was_blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2])


@contextlib.contextmanager
def stop_signals_blocked():
    """Block STOP_SIGNALS while starting child processes, so that a signal sent to the process
    group at that moment waits in each child until it has installed its own disposition."""
    start_resource_tracker()
    blocked = set(STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS) - blocked)


def data_worker_init(parent_pid: int, worker_id: int = 0) -> None:
    """DataLoader worker set-up: the rank that owns the worker handles stop signals.

    A signal sent to the whole process group reaches the workers too; torch's worker handler
    re-raises SIGTERM (killing the worker and then the rank). The workers are forked with the
    signals blocked (see stop_signals_blocked), so ignoring them here also drops any that
    arrived in between. SIGKILL on the rank's death still ends the worker.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    unblock_stop_signals()
    die_with_parent(parent_pid)
