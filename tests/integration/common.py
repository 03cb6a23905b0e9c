"""Shared set-up for the 2-rank integration tests: real-photo shards, a tiny config, launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from tests.helpers.photos import make_photo_shards

ROOT = Path(__file__).resolve().parents[2]
# Uneven shard sizes: 43 samples, 2 ranks x batch 4 -> 5 steps per epoch, 3 samples dropped.
SHARD_SIZES = [13, 7, 11, 3, 9]


def make_shards(folder: Path) -> str:
    make_photo_shards(folder, sizes=SHARD_SIZES, num_classes=4, size=(48, 40))
    return str(folder / "train-{000000..000004}.tar")


def tiny_config(shards: str, log_dir: Path, **overrides) -> dict:
    config = {
        "data": {"batch_size": 4, "crop_size": 32, "num_workers": 2, "pin_mem": False, "shards": shards,
                 "shuffle_buffer": 8},
        "logging": {"folder": str(log_dir), "write_tag": "jepa", "log_freq": 1, "checkpoint_every_steps": 0,
                    "checkpoint_freq": 1},
        "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3],
                 "aspect_ratio": [0.75, 1.5], "num_enc_masks": 1, "num_pred_masks": 2, "min_keep": 2},
        "meta": {"model_name": "vit_tiny", "embed_dim": 48, "depth": 2, "num_heads": 3, "pred_depth": 1,
                 "pred_emb_dim": 24, "seed": 3},
        "optimization": {"epochs": 2, "warmup": 1, "lr": 0.002, "start_lr": 0.0005, "final_lr": 1.0e-6,
                         "weight_decay": 0.04, "final_weight_decay": 0.4, "ema": [0.99, 1.0]},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_main(config_path: Path, *extra: str, devices=("cpu", "cpu"), timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    cmd = [sys.executable, str(ROOT / "main.py"), "--fname", str(config_path), "--devices", *devices, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def read_csv(log_dir: Path, rank: int) -> pd.DataFrame:
    return pd.read_csv(log_dir / f"jepa_r{rank}.csv", dtype={"loss": str})
