"""The local SLURM cluster of launch/slurm/local_cluster.sh as the tests see it."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("IJEPA_SLURM_DIR", "/var/tmp/ijepa-slurm"))


def use_local_cluster_conf() -> str | None:
    """Point SLURM_CONF at the local cluster's config when it is unset and the cluster was started.

    local_cluster.sh keeps its config in its state folder (never /etc/slurm), so sbatch, sacct and
    submitit (and the jobs, which inherit the environment) need SLURM_CONF. An explicit SLURM_CONF,
    e.g. of a real cluster, is kept. Returns the SLURM_CONF in effect."""
    conf = state_dir() / "etc" / "slurm.conf"
    if "SLURM_CONF" not in os.environ and conf.is_file():
        os.environ["SLURM_CONF"] = str(conf)
    return os.environ.get("SLURM_CONF")
