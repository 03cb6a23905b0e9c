"""Run 2 gloo ranks whose objective returns NaN on chosen (rank, step) pairs.

Usage: python nan_run.py CONFIG RANK STEP[,STEP...] [override ...]
"""

import os
import sys

import torch
import torch.multiprocessing as mp

from ijepa_scale.distributed import env as dist_utils
from ijepa_scale.config import load_config
from ijepa_scale.objectives import IJEPAObjective
from ijepa_scale.launchers.entry import setup_logging
from ijepa_scale.training.trainer import Trainer


class NaNOnSteps(IJEPAObjective):
    def __init__(self, loss, rank, bad_rank, bad_steps):
        super().__init__(loss)
        self.calls = 0
        self.poison = rank == bad_rank
        self.bad_steps = bad_steps
        self.trainer = None

    def __call__(self, *args):
        loss, metrics = super().__call__(*args)
        if self.poison and self.trainer.step + 1 in self.bad_steps:
            return loss * float("nan"), metrics
        return loss, metrics


def worker(rank, cfg, bad_rank, bad_steps):
    setup_logging(rank)
    torch.set_num_threads(1)
    env = dist_utils.init_distributed(rank, 2, torch.device("cpu"))
    objective = NaNOnSteps(cfg.optimization.loss, rank, bad_rank, bad_steps)
    trainer = Trainer(cfg, env, objective=objective)
    objective.trainer = trainer
    with dist_utils.leave_group_after():
        try:
            trainer.train()
        finally:
            trainer.close()


if __name__ == "__main__":
    config_path, bad_rank, steps, *overrides = sys.argv[1:]
    cfg = load_config(config_path, overrides)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(dist_utils.find_free_port())
    bad = {int(s) for s in steps.split(",")}
    mp.start_processes(worker, args=(cfg, int(bad_rank), bad), nprocs=2, start_method="spawn")
