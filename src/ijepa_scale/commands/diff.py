"""`ijepa-scale diff A B`: the config keys that differ between two runs, checkpoints or YAML configs."""

from __future__ import annotations

import argparse
import sys

from ..config_diff import IGNORED_KEYS, also_differ, differing_keys, format_table, read_config, show
from ..errors import UserError, one_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ijepa-scale diff",
        description="Print the config keys (dotted) whose resolved values differ between A and B, with both values. "
                    "Each may be a run folder (its params-*.yaml), a checkpoint (*.pth.tar or *.dcp folder: the "
                    "config saved inside) or a YAML config. Old key names resolve to their new place, so they do not "
                    "count as differences. Exit status: 0 no differences, 1 some, 2 an error (as diff(1)).")
    parser.add_argument("a", metavar="A", help="run folder, checkpoint or YAML config")
    parser.add_argument("b", metavar="B", help="run folder, checkpoint or YAML config")
    parser.add_argument("--all", action="store_true",
                        help=f"also list {', '.join(IGNORED_KEYS)} (different for any two runs, left out by default)")
    args = parser.parse_args(argv)
    try:
        configs = [read_config(args.a), read_config(args.b)]
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    differ, left_out = differing_keys(configs, ignored=() if args.all else IGNORED_KEYS)
    print(f"A: {configs[0].describe()}")
    print(f"B: {configs[1].describe()}")
    if differ:
        print(f"{len(differ)} config key(s) differ:")
        rows = [[key, show(a), show(b)] for key, (a, b) in differ.items()]
        print("\n".join(format_table(["key", "A", "B"], rows)))
    else:
        print("no differences")
    if left_out:
        print(f"({also_differ(left_out)}; --all lists it)")
    return 1 if differ else 0
