"""Collapse metrics returned by the objective, the monitor's warnings, and their place in the trainer's log."""

import logging

import pandas as pd
import pytest
import torch

from ijepa_scale.config import ConfigError, config_from_dict
from ijepa_scale.distributed.env import DistEnv
from ijepa_scale.training.collapse import CollapseMonitor
from ijepa_scale.objectives.ijepa import METRIC_NAMES, collapse_metrics, effective_rank
from ijepa_scale.training.trainer import Trainer


def test_effective_rank_counts_equally_used_directions():
    basis = torch.eye(8)
    # Rows +-e_i for 4 directions: centred, 4 equal singular values.
    x = torch.cat([basis[:4], -basis[:4]])
    assert effective_rank(x).item() == pytest.approx(4.0, rel=1e-5)
    # One direction only (plus a constant offset, removed by centring).
    line = torch.linspace(-1, 1, 10)[:, None] * basis[0] + 5.0
    assert effective_rank(line).item() == pytest.approx(1.0, rel=1e-3)
    # More samples than dimensions (the other Gram matrix): 8 equally used directions.
    assert effective_rank(torch.cat([torch.eye(8), -torch.eye(8)] * 3)).item() == pytest.approx(8.0, rel=1e-4)
    assert effective_rank(torch.ones(6, 8)).item() == 0.0  # every sample the same: no spread at all
    # Unequal use of two directions: strictly between 1 and 2.
    two = torch.cat([basis[:2] * torch.tensor([[3.0], [1.0]]), -basis[:2] * torch.tensor([[3.0], [1.0]])])
    assert 1.0 < effective_rank(two).item() < 2.0


def test_collapse_metrics_values():
    predictions = torch.zeros(2, 3, 4)
    predictions[..., 0] = 2.0  # every predicted token has L2 norm 2
    tokens = torch.randn(16, 5, 12, generator=torch.Generator().manual_seed(0))
    normed = torch.nn.functional.layer_norm(tokens, (12,))
    metrics = collapse_metrics(predictions, normed, tokens.mean(dim=1))
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["pred_norm"].item() == pytest.approx(2.0)
    assert metrics["target_std"].item() == pytest.approx(normed.std(dim=0).mean().item(), rel=1e-5)
    centred = tokens.mean(dim=1) - tokens.mean(dim=(0, 1))
    s = torch.linalg.svdvals(centred)
    p = s / s.sum()
    assert metrics["eff_rank"].item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-4)
    # The same tokens for every image: no variation across the batch and no rank.
    same = tokens[:1].expand(16, -1, -1).clone()
    collapsed = collapse_metrics(predictions, torch.nn.functional.layer_norm(same, (12,)), same.mean(dim=1))
    assert collapsed["target_std"].item() == pytest.approx(0.0, abs=1e-3)
    assert collapsed["eff_rank"].item() == 0.0


def test_monitor_warns_once_after_patience_consecutive_lows(caplog):
    monitor = CollapseMonitor({"pred_norm": 0.5, "eff_rank": 0.0}, patience=3)
    assert monitor.thresholds == {"pred_norm": 0.5}  # 0 disables a metric
    with caplog.at_level(logging.WARNING, logger="ijepa_scale"):
        assert monitor.update({"pred_norm": 0.1}, step=10) == []
        assert monitor.update({"pred_norm": 0.9}, step=20) == []  # recovered: the count restarts
        assert monitor.update({"pred_norm": 0.1}, step=30) == []
        assert monitor.update({"pred_norm": float("nan")}, step=35) == []  # a skipped step is neutral
        assert monitor.update({"pred_norm": 0.2}, step=40) == []
        warnings = monitor.update({"pred_norm": 0.3}, step=50)
        assert monitor.update({"pred_norm": 0.3}, step=60) == []  # once per episode
    assert len(warnings) == 1
    assert "step 50" in warnings[0] and "pred_norm" in warnings[0] and "collapse.thresholds.pred_norm" in warnings[0]
    assert [r.getMessage() for r in caplog.records] == warnings
    restored = CollapseMonitor({"pred_norm": 0.5}, patience=3)
    restored.load_state_dict(monitor.state_dict())
    assert restored.below == monitor.below


def test_collapse_and_eval_keys_are_validated():
    base = {"data": {"shards": "x.tar"}}
    with pytest.raises(ConfigError, match="collapse.thresholds.eff_rank=-1.0 must be >= 0"):
        config_from_dict({**base, "collapse": {"thresholds": {"eff_rank": -1}}})
    with pytest.raises(ConfigError, match="collapse.patience=0 must be > 0"):
        config_from_dict({**base, "collapse": {"patience": 0}})
    with pytest.raises(ConfigError, match="need evaluation.train_shards"):
        config_from_dict({**base, "evaluation": {"every_epochs": 1}})
    cfg = config_from_dict({**base, "evaluation": {"train_shards": "a.tar", "val_shards": "b.tar", "every_steps": 5}})
    assert cfg.evaluation.every_steps == 5 and cfg.evaluation.every_epochs == 0


def make_trainer(shards, folder, patience=5, thresholds=None, **evaluation):
    cfg = config_from_dict({
        "data": {"batch_size": 4, "crop_size": 32, "num_workers": 0, "shards": shards, "pin_mem": False},
        "evaluation": {"train_shards": shards, "val_shards": shards, **evaluation},
        "collapse": {"patience": patience, "thresholds": thresholds or {}},
        "logging": {"folder": str(folder), "log_freq": 1},
        "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3],
                 "aspect_ratio": [0.75, 1.5], "num_pred_masks": 2, "min_keep": 2},
        "meta": {"model_name": "vit_tiny", "embed_dim": 48, "depth": 1, "num_heads": 3, "pred_depth": 1,
                 "pred_emb_dim": 24},
        "optimization": {"epochs": 2, "warmup": 1, "ema": [0.9, 1.0]},
    })
    return Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def test_trainer_logs_the_objective_metrics_and_periodic_knn(shards, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ijepa_scale"):
        trainer = make_trainer(shards, tmp_path / "eval", every_epochs=1, every_steps=4,
                               thresholds={"eff_rank": 100.0}, patience=2)
        assert trainer.train()
        trainer.close()
    frame = pd.read_csv(tmp_path / "eval" / "jepa_r0.csv")
    assert list(frame.columns[-4:]) == ["pred_norm", "target_std", "eff_rank", "knn_acc"]
    assert (frame["pred_norm"] > 0).all() and (frame["target_std"] > 0).all()
    assert ((frame["eff_rank"] > 1) & (frame["eff_rank"] <= 3)).all()  # batch of 4: at most 3 after centring
    # 6 steps per epoch: evaluated at steps 4, 6 (epoch end), 8 and 12.
    evaluated = frame.loc[frame["knn_acc"].notna(), "step"].tolist()
    assert evaluated == [4, 6, 8, 12]
    assert frame["knn_acc"].dropna().between(0, 1).all()
    messages = [r.getMessage() for r in caplog.records]
    assert any("k-NN accuracy of the target encoder" in m for m in messages)
    assert any("pred_norm" in m and "eff_rank" in m and "[ep 1, itr 1/6, step 1]" in m for m in messages)
    assert sum("possible collapse" in m and "eff_rank" in m for m in messages) == 1


def test_periodic_evaluation_leaves_training_bit_identical(shards, tmp_path):
    runs = {}
    for name, every in (("plain", 0), ("eval", 1)):
        trainer = make_trainer(shards, tmp_path / name, every_steps=every)
        trainer.train()
        runs[name] = (pd.read_csv(tmp_path / name / "jepa_r0.csv", dtype={"loss": str}),
                      trainer.state_dict(), torch.get_rng_state())
        trainer.close()
    (plain, a, rng_a), (evaluated, b, rng_b) = runs["plain"], runs["eval"]
    assert evaluated["knn_acc"].notna().all() and plain["knn_acc"].isna().all()
    assert plain["loss"].tolist() == evaluated["loss"].tolist()
    for key in ("encoder", "predictor", "target_encoder"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert torch.equal(rng_a, rng_b)


def test_effective_rank_of_non_finite_features_is_nan_not_an_error():
    x = torch.randn(16, 8)
    x[3, 2] = float("inf")
    x[5, 1] = float("nan")
    assert torch.isnan(effective_rank(x))
    overflowed = torch.randn(16, 8) * 3e38 * 10  # inf in float32
    assert torch.isnan(effective_rank(overflowed))
    assert effective_rank(torch.randn(16, 8)) > 1
