"""Telling a person how a run goes: slow-wait notices, ETAs, memory."""

from __future__ import annotations

import logging
import math
import resource
import threading
import time

import torch

logger = logging.getLogger("ijepa_scale")

SLOW_NOTICE_S = 10.0


class slow_notice:
    """Log "`what`: still waiting after N s" if the block takes longer than `after` seconds, and how
    long it took once it ends; a fast block logs nothing."""

    def __init__(self, what: str, enabled: bool = True, after: float = SLOW_NOTICE_S):
        self.what, self.enabled, self.after = what, enabled, after
        self.fired, self.timer = False, None

    def _fire(self):
        self.fired = True
        logger.info("%s: still waiting after %.0f s ...", self.what, self.after)

    def start(self) -> "slow_notice":
        self.began = time.perf_counter()
        self.timer = threading.Timer(self.after, self._fire) if self.enabled else None
        if self.timer:
            self.timer.daemon = True
            self.timer.start()
        return self

    def stop(self) -> None:
        """End the wait; later calls do nothing."""
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if self.fired:
            self.fired = False
            logger.info("%s: done after %.1f s", self.what, time.perf_counter() - self.began)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0.0, seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
