"""Launchers: `local` (one process per device, or one torchrun rank) and the per-rank `entry`
that every launcher calls in each training process."""

from .entry import RunResult, run_rank

__all__ = ["RunResult", "run_rank"]
