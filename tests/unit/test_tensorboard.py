"""logging.tensorboard: rank 0's scalars, read back with TensorBoard's own reader."""

import pandas as pd
import pytest
import torch

from ijepa_scale.config import config_from_dict
from ijepa_scale.distributed.env import DistEnv
from ijepa_scale.training.trainer import Trainer

pytest.importorskip("tensorboard")


def test_event_files_hold_the_csv_values(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_from_dict({
        "data": {"batch_size": 4, "crop_size": 32, "num_workers": 0, "shards": shards, "pin_mem": False},
        "logging": {"folder": str(tmp_path), "tensorboard": True, "log_freq": 2},
        "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3],
                 "aspect_ratio": [0.75, 1.5], "num_pred_masks": 2, "min_keep": 2},
        "meta": {"model_name": "vit_tiny", "embed_dim": 48, "depth": 1, "num_heads": 3, "pred_depth": 1,
                 "pred_emb_dim": 24},
        "optimization": {"epochs": 1, "warmup": 1, "ema": [0.9, 1.0]},
    })
    trainer = Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert trainer.train()
    trainer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/wd", "train/momentum", "train/grad_norm", "train/img_per_s",
            "masks/mask-A", "masks/mask-B", "train/time_ms", "train/epoch", "train/max_mem_mb"} <= tags
    csv = pd.read_csv(tmp_path / "jepa_r0.csv")
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == csv["step"].tolist() == list(range(1, 7))
    assert [e.value for e in loss] == pytest.approx(csv["loss"].tolist(), rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(csv["lr"].tolist(), rel=1e-6)
