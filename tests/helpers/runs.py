"""Real tiny training runs (1 rank, CPU, in this process) for the report and diff tests."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ijepa_scale.distributed.env import DistEnv
from ijepa_scale.training.trainer import Trainer
from tests.unit.test_launchers import tiny_cfg

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def train_tiny_run(shards: str, folder: Path, epochs: int = 2, knn: bool = False, **optimization) -> list[str]:
    """Train a vit_tiny run of `epochs` x 6 steps into `folder`; returns rank 0's log lines. `knn`: a k-NN
    evaluation every 2 steps (on the training shards)."""
    cfg = tiny_cfg(shards, folder, epochs=epochs, **optimization)
    if knn:
        cfg.evaluation.every_steps = 2
        cfg.evaluation.train_shards = cfg.evaluation.val_shards = shards
    logger, handler = logging.getLogger("ijepa_scale"), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trainer = Trainer(cfg, CPU)
        trainer.train()
        trainer.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return handler.lines
