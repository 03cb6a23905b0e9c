"""Saccade JEPA: shift code and its inverse, affine views, the loss terms by hand, both backbones."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ijepa_scale.errors import UserError
from ijepa_scale.models import build_encoder
from ijepa_scale.models.convnext import ConvNeXt
from ijepa_scale.objectives.base import resolve
from ijepa_scale.models.saccade import SHIFT_CODE_DIM, SaccadePredictor, encode_shift, frequency_encoding
from ijepa_scale.objectives.saccade import (SaccadeConfig, SaccadeObjective, SaccadeViews, affine_matrices,
                                            center_crop, inverse_shift, warp)


def test_frequency_encoding_by_hand():
    code = frequency_encoding(torch.tensor([0.25]), 2)
    expected = [math.sin(math.pi / 4), math.sin(math.pi / 2), math.cos(math.pi / 4), math.cos(math.pi / 2)]
    assert code[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert encode_shift(torch.zeros(2, 3)).shape == (2, SHIFT_CODE_DIM) == (2, 36)


def test_inverse_shift_composes_to_identity_and_is_not_the_negated_code():
    shift = torch.tensor([[0.03, 0.1, -0.2], [-0.02, 0.3, 0.05]])
    inv = inverse_shift(shift)
    forward, backward = affine_matrices(shift), affine_matrices(inv)
    square = lambda a: torch.cat([a, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(len(a), 1, 3)], dim=1)
    assert torch.allclose(square(forward) @ square(backward), torch.eye(3).expand(2, 3, 3), atol=1e-6)
    assert torch.allclose(inverse_shift(inv), shift, atol=1e-7)
    # Pure translation: the inverse is -t. Its code negates the sine half but keeps the cosine half,
    # so the original's "negate the code" differs from the code of the inverse.
    t = torch.tensor([[0.0, 0.1, -0.2]])
    code, inv_code = encode_shift(t), encode_shift(inverse_shift(t))
    assert torch.allclose(inverse_shift(t), -t)
    rot_sin, rot_cos = slice(0, 10), slice(10, 20)
    tx_sin, tx_cos = slice(20, 24), slice(24, 28)
    assert torch.allclose(inv_code[:, tx_sin], -code[:, tx_sin], atol=1e-6)
    assert torch.allclose(inv_code[:, tx_cos], code[:, tx_cos], atol=1e-6)
    assert torch.allclose(inv_code[:, rot_cos], code[:, rot_cos])  # cos(0) stays 1
    assert not torch.allclose(inv_code, -code)


def test_warp_translation_and_rotation_move_pixels_as_computed():
    image = torch.arange(36.0).reshape(1, 1, 6, 6)
    # tx = 2/W in [-1, 1] coordinates is one pixel: output column j samples input column j + 1
    moved = warp(image, torch.tensor([[0.0, 2 / 6, 0.0]]))
    assert torch.equal(moved[0, 0, :, :5], image[0, 0, :, 1:])
    assert torch.equal(moved[0, 0, :, 5], torch.zeros(6))
    # a quarter turn maps pixel centres onto pixel centres: out[r, c] = in[c, W - 1 - r]
    turned = warp(image, torch.tensor([[math.pi / 2, 0.0, 0.0]]))
    expected = torch.stack([torch.stack([image[0, 0, c, 5 - r] for c in range(6)]) for r in range(6)])
    assert torch.equal(turned[0, 0], expected)
    assert torch.equal(warp(image, torch.zeros(1, 3)), image)


def test_views_are_deterministic_per_step_and_consistent_with_the_shift():
    views = SaccadeViews(image_size=20, config=SaccadeConfig(crop_fraction=0.5), seed=3)
    assert views.crop_size == 10 and views.max_translate == pytest.approx(int(10 * 0.9) / 20)
    torch.manual_seed(0)
    images = torch.rand(16, 3, 20, 20)
    a, b = views(images, step=5), views(images, step=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(views(images, step=6)["shift"], a["shift"])
    assert a["context"].shape == a["target"].shape == (16, 3, 10, 10)
    assert a["shift"][:, 0].abs().max() <= math.radians(2.0)
    assert a["shift"][:, 1:].abs().max() <= views.max_translate
    shift, swap = views.sample(16, 5)
    assert 0 < swap.sum() < 16
    plain = center_crop(images, 10)
    warped = center_crop(warp(images, shift), 10)
    for i in range(16):
        context, target = (plain[i], warped[i]) if swap[i] else (warped[i], plain[i])
        assert torch.equal(a["context"][i], context) and torch.equal(a["target"][i], target)
        # shift goes from context to target; shift_back is its inverse
        expected = inverse_shift(shift[i:i + 1])[0] if swap[i] else shift[i]
        assert torch.allclose(a["shift"][i], expected)
        assert torch.allclose(inverse_shift(a["shift"][i:i + 1])[0], a["shift_back"][i], atol=1e-7)


def test_loss_terms_by_hand():
    cfg = SaccadeConfig()
    obj = SaccadeObjective(cfg)
    torch.manual_seed(0)
    predictor = SaccadePredictor(2, depth=1)
    nets = {"student": nn.Flatten(), "target_encoder": nn.Flatten(), "predictor": predictor}
    context = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    target = torch.tensor([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0], [2.0, -1.0]])
    shift = torch.tensor([[0.01, 0.1, 0.0]] * 4)
    batch = {"context": context, "target": target, "shift": shift, "shift_back": inverse_shift(shift)}
    loss, metrics = obj(nets, batch)
    p, back = predictor(context, shift, inverse_shift(shift))
    huber = F.huber_loss(p, target)
    cycle = F.mse_loss(back, context)
    # Variance: dim 0 values (1,-1,0,0): unbiased var 2/3; dim 1 (0,0,2,-2): 8/3; gamma 4
    var = ((4 - math.sqrt(2 / 3 + 1e-4)) + (4 - math.sqrt(8 / 3 + 1e-4))) / 2
    # Covariance: the dims are uncorrelated (sum of products 0), so the off-diagonal term is 0
    assert metrics["var_loss"].item() == pytest.approx(var, rel=1e-5)
    assert metrics["cov_loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx((huber + 0.25 * cycle + 25 * var).item(), rel=1e-5)
    correlated = dict(batch, context=torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), target=target[:2],
                      shift=shift[:2], shift_back=inverse_shift(shift[:2]))
    _, m2 = obj(nets, correlated)
    # cov matrix [[2, 2], [2, 2]]: off-diagonal squares 4 + 4, over D = 2
    assert m2["cov_loss"].item() == pytest.approx(4.0, rel=1e-6)
    assert set(metrics) == set(obj.metric_names)


@pytest.mark.parametrize("backbone", ["vit", "convnext_atto"])
def test_backbones_train_and_only_the_student_gets_gradients(backbone):
    torch.manual_seed(0)
    obj = SaccadeObjective(SaccadeConfig(backbone=backbone, embed_dim=24, crop_fraction=0.8))
    encoder = build_encoder("vit_tiny", img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    nets = obj.build_networks(encoder)
    nets.update(obj.ema_networks(nets))
    views = SaccadeViews(40, obj.config)
    batch = views(torch.rand(4, 3, 40, 40), step=0)
    loss, metrics = obj(nets, batch)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    assert all(p.grad is None for p in nets["target_encoder"].parameters())
    assert sum(p.grad.abs().sum() for p in nets["student"].parameters() if p.grad is not None) > 0
    width = 16 if backbone == "vit" else 24
    assert obj.teacher(nets, batch["target"]).shape == (4, width)
    before = [p.clone() for p in nets["target_encoder"].parameters()]
    online = resolve(nets, obj.ema["target_encoder"])
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    obj.ema_update(nets["target_encoder"], online, 0.75)
    for b, t, s in zip(before, nets["target_encoder"].parameters(), online.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * s)


def test_convnext_shapes_and_config_errors():
    net = ConvNeXt(in_chans=1, num_classes=5, depths=(1, 1), dims=(8, 16))
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="at least 8 px"):
        net(torch.randn(2, 1, 4, 4))
    with pytest.raises(UserError, match="saccade.backbone='resnet50'"):
        SaccadeConfig(backbone="resnet50")
