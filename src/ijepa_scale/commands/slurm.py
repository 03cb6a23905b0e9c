"""`ijepa-scale slurm` (and main_distributed.py): submit pretraining to SLURM through submitit."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional

from ..errors import UserError
from ..launchers.slurm import ARRAY_PARALLELISM, submit
from ..version import VersionAction


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, like every other user mistake (argparse would print the whole usage first).
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, description="Submit I-JEPA pretraining to SLURM (submitit); requeues itself on time limits "
                               "and preemption. Flags override --preset, which overrides the defaults shown.")
    add = parser.add_argument
    add("--version", action=VersionAction)
    add("--fname", default="configs.yaml", help="YAML config (with --batch-launch: a YAML list of configs)")
    add("--folder", default="logs/submitit", help="submitit's folder: per-job stdout/stderr, pickles, the "
                                                  "submission record (default %(default)s)")
    add("--preset", help="launch/slurm/NAME.yaml (or a path): partition, account, qos, cpus, memory, ...")
    add("--partition", help="SLURM partition (default: the cluster's default)")
    add("--account")
    add("--qos")
    add("--exclude", help="nodes not to use")
    add("--constraint", help="node features, e.g. volta32gb")
    add("--nodelist", help="nodes to use")
    add("--nodes", type=int, help="default 1")
    add("--tasks-per-node", type=int, help="ranks per node, one per GPU (default 1)")
    add("--cpus-per-task", type=int, help="torch threads plus data workers per rank (default 10)")
    add("--gpus-per-node", type=int, help="default: --tasks-per-node; 0 = CPU job (gloo)")
    add("--mem-per-gpu", help="e.g. 55G")
    add("--mem", help="memory per node, e.g. 64G")
    add("--time", type=int, help="time limit in minutes (default 4300)")
    add("--signal-delay", type=int, help="seconds of warning before the time limit (default 120)")
    add("--max-requeues", type=int, help="requeues after time limits (preemptions are not counted; default 20)")
    add("--job-name", help="default ijepa-<config name>")
    add("--batch-launch", action="store_true", help="--fname lists config files; submit all in one job array")
    add("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
        help="repeatable: one run per combination of the values of all --sweep flags, submitted as one job array; "
             "each run in logging.folder/<its overrides>, listed in logging.folder/sweep.json")
    add("--array-parallelism", type=int, metavar="N",
        help=f"tasks of a job array (--sweep, --batch-launch) that run at once (default {ARRAY_PARALLELISM})")
    add("--mail-type", metavar="TYPE[,TYPE...]",
        help="sbatch --mail-type, e.g. END,FAIL (ARRAY_TASKS: one mail per array task)")
    add("--mail-user", metavar="ADDRESS", help="sbatch --mail-user (default: the submitting user)")
    add("--dependency", metavar="TYPE:JOBID",
        help="sbatch --dependency, e.g. afterok:1234 (start after job 1234 succeeded)")
    add("--dry-run", action="store_true", help="print the sbatch script and the resolved config; submit nothing")
    add("overrides", nargs="*", help="config overrides such as optimization.epochs=2 (applied to every config)")
    return parser


def parse_args(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    return build_parser(prog).parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """`prog`: the script that was run (main_distributed.py); None for `ijepa-scale slurm`."""
    args = parse_args(argv, prog or "ijepa-scale slurm")
    shown = sys.argv[1:] if argv is None else argv
    command = [sys.executable, prog] if prog else [sys.executable, "-m", "ijepa_scale.cli", "slurm"]
    command_line = f"cd {shlex.quote(os.getcwd())} && " + shlex.join([*command, *shown])
    try:
        return submit(args, command_line)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
