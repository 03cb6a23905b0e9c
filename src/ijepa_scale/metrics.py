"""Per-rank CSV metrics: `{folder}/{tag}_r{rank}.csv`, one row per step.

The first six columns are the official ones; the rest are ijepa-scale's.  On
resume the file is cut back to the rows of steps <= the resumed step, so it
keeps one header and has no duplicated or missing step.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

COLUMNS = (
    "epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)",
    "step", "lr", "wd", "momentum", "grad_norm", "img_per_s", "data_ms",
    "skipped", "skipped_steps", "max_mem_mb",
)


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest repr that round-trips: full precision
    return str(value)


class CSVMetrics:
    def __init__(self, path: str | Path, resume_step: int | None, extra_columns: tuple[str, ...] = ()):
        """`extra_columns` (e.g. the objective's metrics) follow the fixed ones; a None value is written empty."""
        self.path = Path(path)
        self.columns = COLUMNS + tuple(c for c in extra_columns if c not in COLUMNS)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.exists():
            self._file = open(self.path, "w", newline="")
            self._file.write(",".join(self.columns) + "\n")
        else:
            self._truncate_after(resume_step)
            self._file = open(self.path, "a", newline="")
        self._file.flush()

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        columns = self.columns
        if not rows or tuple(rows[0]) != columns:
            # E.g. the official code's CSV of the run being continued: keep it beside ours.
            kept = self.path.with_name(f"{self.path.stem}.previous-{int(time.time())}{self.path.suffix}")
            os.replace(self.path, kept)
            logger.warning("%s has another header (official run?); moved it to %s", self.path, kept.name)
            rows = [list(columns)]
        step_col = columns.index("step")
        kept = [r for r in rows[1:] if len(r) == len(columns) and int(r[step_col]) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            f.write(",".join(columns) + "\n")
            for row in kept:
                f.write(",".join(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, **values) -> None:
        missing = set(self.columns) - set(values)
        assert not missing, f"missing metric columns: {sorted(missing)}"
        self._file.write(",".join(_format(values[c]) for c in self.columns) + "\n")
        self._file.flush()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
