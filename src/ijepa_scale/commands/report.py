"""`ijepa-scale report LOGDIR`: a summary of a run's per-rank CSVs and a PNG of its curves."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError, one_line
from ..run_report import report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ijepa-scale report",
        description="Summarise a run's per-rank CSVs (steps, throughput, data wait, skipped, loss, stragglers) "
                    "and draw loss, lr, throughput and mask sizes into a PNG. Works while the run is writing.")
    parser.add_argument("logdir", help="the run's logging.folder (or one CSV file)")
    parser.add_argument("--out", default=None, help="PNG path (default LOGDIR/report.png)")
    args = parser.parse_args(argv)
    try:
        text, png, _ = report(args.logdir, args.out)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {png}")
    return 0
