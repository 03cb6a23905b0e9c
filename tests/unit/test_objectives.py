"""The I-JEPA objective's optional variance/covariance regulariser: its terms on hand-computed cases,
its config keys, and that it is off (the official objective, golden losses) by default."""

import pytest
import torch

from ijepa_scale.config import ConfigError, config_from_dict
from ijepa_scale.objectives import build_objective
from ijepa_scale.objectives.ijepa import METRIC_NAMES, IJEPAObjective, variance_covariance
from tests.helpers.tiny_ijepa import tiny_ijepa_batch


def test_variance_term_by_hand():
    # Two dims: one with std 2 (no penalty at gamma 1), one constant (std sqrt(1e-4) = 0.01).
    x = torch.tensor([[2.0, 5.0], [-2.0, 5.0], [2.0, 5.0], [-2.0, 5.0]])
    # unbiased var of +-2 over 4 samples = 16/3
    variance, covariance = variance_covariance(x, gamma=1.0)
    assert variance.item() == pytest.approx((0.0 + (1.0 - 0.01)) / 2, rel=1e-5)
    assert covariance.item() == pytest.approx(0.0, abs=1e-7)  # the constant dim has no covariance
    # gamma 3 penalises the first dim too: 3 - sqrt(16/3 + 1e-4)
    variance3, _ = variance_covariance(x, gamma=3.0)
    expected = ((3.0 - (16 / 3 + 1e-4) ** 0.5) + (3.0 - 0.01)) / 2
    assert variance3.item() == pytest.approx(expected, rel=1e-5)


def test_covariance_term_by_hand():
    # Perfectly correlated dims: cov matrix [[v, v], [v, v]] with v = 1 (values +-1 over 2 samples: var 2).
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    _, covariance = variance_covariance(x)
    # off-diagonal entries 2 and 2 -> (4 + 4) / D=2
    assert covariance.item() == pytest.approx(4.0, rel=1e-6)
    # Uncorrelated (orthogonal) dims: no covariance.
    y = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert variance_covariance(y)[1].item() == pytest.approx(0.0, abs=1e-7)


def test_regulariser_adds_weighted_terms_and_logs_them():
    enc, pred, tgt, images, masks_enc, masks_pred = tiny_ijepa_batch()
    plain_loss, plain_metrics = IJEPAObjective().losses(enc, pred, tgt, images, masks_enc, masks_pred)
    assert set(plain_metrics) == set(METRIC_NAMES)
    obj = IJEPAObjective(variance_weight=2.0, covariance_weight=0.5)
    loss, metrics = obj.losses(enc, pred, tgt, images, masks_enc, masks_pred)
    assert obj.metric_names == METRIC_NAMES + ("pred_loss", "var_loss", "cov_loss")
    assert metrics["pred_loss"].item() == pytest.approx(plain_loss.item(), rel=1e-6)
    expected = plain_loss + 2.0 * metrics["var_loss"] + 0.5 * metrics["cov_loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["var_loss"].item() > 0
    # The terms reach the context encoder's parameters (and only through the encoder, not the target).
    loss.backward()
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tgt.parameters())


def test_config_keys_default_off_and_validated():
    cfg = config_from_dict({"data": {"shards": "x.tar"}, "logging": {"folder": "/tmp/x"}})
    obj = build_objective(cfg)
    assert not obj.regularised and obj.metric_names == METRIC_NAMES
    cfg = config_from_dict({"data": {"shards": "x.tar"}, "logging": {"folder": "/tmp/x"},
                            "optimization": {"variance_weight": 1.0, "covariance_weight": 1.0}})
    assert build_objective(cfg).regularised
    with pytest.raises(ConfigError, match="optimization.variance_weight=-1"):
        config_from_dict({"data": {"shards": "x.tar"}, "logging": {"folder": "/tmp/x"},
                          "optimization": {"variance_weight": -1}})


def test_a_saved_objective_section_with_keys_of_another_version_still_builds_the_evaluated_network():
    from ijepa_scale.objectives import SaccadeConfig, evaluated_network, settings_from_saved

    assert settings_from_saved(SaccadeConfig, {"crop_fraction": 0.5, "added_later": 1}).crop_fraction == 0.5
    config = {"meta": {"objective": "saccade", "model_name": "vit_tiny", "embed_dim": 48, "depth": 1,
                       "num_heads": 3},
              "data": {"crop_size": 32}, "mask": {"patch_size": 8},
              "saccade": {"crop_fraction": 0.75, "added_later": True}}
    encoder, size = evaluated_network(config)
    assert size == 24 and encoder.embed_dim == 48
