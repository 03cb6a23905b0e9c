"""`ijepa-scale report LOGDIR [LOGDIR ...]`: a summary of a run's per-rank CSVs and a PNG of its curves; for
several runs, one table, one PNG overlaying them and the config keys where they differ."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError, one_line
from ..run_report import compare


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ijepa-scale report",
        description="Summarise a run's per-rank CSVs (steps, throughput, data wait, skipped, loss, stragglers) "
                    "and draw loss, lr, throughput and mask sizes into a PNG. Works while the run is writing. "
                    "Several runs (or a folder whose subfolders are runs, such as a sweep) are compared: one row "
                    "each, one PNG overlaying loss, lr, throughput per rank, k-NN and collapse metrics, and the "
                    "config keys that differ.")
    parser.add_argument("logdir", nargs="+", help="the run's logging.folder (or one CSV file); several to compare")
    parser.add_argument("--out", default=None,
                        help="PNG path (default LOGDIR/report.png; for several runs compare.png in their common "
                             "parent folder, else in the current folder)")
    parser.add_argument("--log-y", action="store_true", help="draw the loss on a log axis")
    args = parser.parse_args(argv)
    try:
        text, png, _ = compare(args.logdir, args.out, log_y=args.log_y)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {png}")
    return 0
