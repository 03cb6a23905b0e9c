"""Evaluation results: a printed table and rows appended to a CSV beside the checkpoint."""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger("ijepa_scale")

CSV_COLUMNS = ("checkpoint", "step", "key", "pool", "method", "accuracy", "n_train", "n_val", "seconds",
               "shots", "seeds", "accuracy_std", "l2", "l2_grid")
# `shots`: labelled images per class ("" = all); `accuracy` is then the mean over `seeds` draws and
# `accuracy_std` their standard deviation. `l2`: the probe's chosen L2 (per draw, "/"-joined when they
# differ); `l2_grid`: the range it was chosen from, and whether the grid widened or hit its bound.


def format_table(rows: list[dict]) -> str:
    header = list(CSV_COLUMNS)
    cells = [[_cell(row.get(c, ""), c) for c in header] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value, column: str) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if column.startswith("accuracy") else f"{value:.1f}"
    return str(value)


def append_rows(path: str | Path, rows: list[dict]) -> Path:
    """Append rows (one per evaluation); a file with another header is moved aside first."""
    path = Path(path)
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and tuple(header) != CSV_COLUMNS and CSV_COLUMNS[:len(header)] == tuple(header):
            _add_columns(path, len(header))  # an older eval.csv: its rows gain the new columns, empty
        elif header is not None and tuple(header) != CSV_COLUMNS:
            kept = path.with_name(f"{path.stem}.previous-{int(time.time())}{path.suffix}")
            os.replace(path, kept)
            logger.warning("%s has another header; moved it to %s", path, kept.name)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([row.get(c, "") for c in CSV_COLUMNS])
        f.flush()
        os.fsync(f.fileno())
    return path


def _add_columns(path: Path, old_width: int) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    logger.info("%s: added the columns %s", path, ", ".join(CSV_COLUMNS[old_width:]))
