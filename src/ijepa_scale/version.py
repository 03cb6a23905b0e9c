"""The package version and the git commit of the checkout it runs from, for `--version`, the run's
params yaml and its log."""

from __future__ import annotations

import argparse
import functools
import subprocess
from pathlib import Path

from . import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs (a stale lock on a network disk)
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """`<short sha>` of the checkout this package is imported from, `-dirty` when a tracked file differs
    from it; None when git, or a checkout holding this package, is missing (e.g. a wheel install)."""
    top = _git("rev-parse", "--show-toplevel")
    # A package installed inside some other repository (a dotfiles repo holding site-packages) is not ours.
    if not top or Path(top).resolve() / "src" / "ijepa_scale" != PACKAGE_DIR:
        return None
    sha = _git("rev-parse", "--short", "HEAD")
    if not sha:
        return None
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return sha + ("-dirty" if changes else "")


def version_line() -> str:
    """`ijepa-scale 0.1.0 (git 1a2b3c4)`, `(git 1a2b3c4-dirty)` or `(no git)`."""
    commit = git_commit()
    return f"ijepa-scale {__version__} ({'git ' + commit if commit else 'no git'})"


def run_info() -> dict:
    """What a run records of the code that ran it (the params yaml's `ijepa_scale` entry)."""
    return {"version": __version__, "git": git_commit()}


class VersionAction(argparse.Action):
    """`--version` for a command's own parser (main.py, main_distributed.py): prints version_line() and exits;
    git is only asked when the flag is given."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the version and git commit, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()
