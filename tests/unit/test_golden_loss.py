"""Per-step losses of a tiny deterministic run, checked in: a refactor must not change the numbers.

Regenerate (only for an intended change of training semantics) with
`UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_golden_loss.py` and say why in the commit.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from ijepa_scale.config import config_from_dict
from ijepa_scale.distributed.env import DistEnv
from ijepa_scale.training.trainer import Trainer
from tests.helpers.photos import make_photo_shards

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "golden_losses_tiny.json"


def run_tiny(tmp_path) -> list[float]:
    make_photo_shards(tmp_path / "shards", sizes=[10, 10], num_classes=2, size=(40, 40), seed=7)
    cfg = config_from_dict({
        "data": {"batch_size": 4, "crop_size": 32, "num_workers": 0, "pin_mem": False,
                 "shards": str(tmp_path / "shards" / "train-{000000..000001}.tar"), "shuffle_buffer": 6},
        "logging": {"folder": str(tmp_path / "run")},
        "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3],
                 "aspect_ratio": [0.75, 1.5], "num_pred_masks": 2, "min_keep": 2},
        "meta": {"model_name": "vit_tiny", "embed_dim": 48, "depth": 2, "num_heads": 3, "pred_depth": 1,
                 "pred_emb_dim": 24, "seed": 11},
        "optimization": {"epochs": 2, "warmup": 1, "lr": 0.002, "start_lr": 0.0005, "ema": [0.99, 1.0]},
    })
    torch.set_num_threads(1)
    trainer = Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    losses = []
    for _ in range(2):
        for batch in trainer.stream.epoch_batches():
            losses.append(trainer.train_step(batch)["loss"])
    trainer.close()
    return losses


def test_losses_match_the_golden_file(tmp_path):
    losses = run_tiny(tmp_path)
    assert len(losses) == 10
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    # Bitwise on the machine that wrote the file; other CPUs may round a few ulps differently.
    assert losses == pytest.approx(golden, rel=1e-5, abs=1e-7)
