"""Gated I-JEPA: gate sampling and clamping, hard eval gates, gating locations, penalty by hand, the loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from ijepa_scale.errors import UserError
from ijepa_scale.models import build_encoder
from ijepa_scale.models.gated import GatedViT, HardConcreteGate, relaxed_bernoulli
from ijepa_scale.objectives.gated import GatedConfig, GatedObjective, gate_penalty, reconstruction_loss


def _encoder(depth=2):
    torch.manual_seed(0)
    return build_encoder("vit_tiny", img_size=16, patch_size=8, embed_dim=16, depth=depth, num_heads=2)


def test_vit_embed_and_block_branches_compose_to_forward():
    enc = _encoder()
    images = torch.randn(2, 3, 16, 16)
    x = enc.embed(images)
    for block in enc.blocks:
        x = x + block.attn_branch(x)
        x = x + block.mlp_branch(x)
    assert torch.equal(enc.norm(x), enc(images))


def test_penalty_by_hand():
    # image 0: every gate at sigmoid(0) = 0.5; image 1: sigmoid(log 3) = 0.75
    log_alpha = torch.tensor([[0.0, 0.0, 0.0], [math.log(3)] * 3])
    penalty, fraction = gate_penalty(log_alpha, lambda_gates=1.0, alpha=4.0)
    assert fraction.tolist() == pytest.approx([0.5, 0.75], rel=1e-6)
    assert penalty.item() == pytest.approx(((math.exp(2) - 1) + (math.exp(3) - 1)) / 2, rel=1e-6)
    assert gate_penalty(log_alpha[:1], 1.0, 4.0)[0].item() == pytest.approx(6.389, abs=1e-3)  # the note's 6.39
    assert gate_penalty(log_alpha, 0.25, 4.0)[0].item() == pytest.approx(penalty.item() / 4, rel=1e-6)
    # reconstruction: mean over tokens of the squared distance summed over D
    p, t = torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    assert reconstruction_loss(p, t).item() == pytest.approx((2 + 4) / 2)


def test_eval_gates_are_hard_and_training_gates_relaxed():
    gate = HardConcreteGate(8)
    tokens = torch.randn(4, 10, 8) * 5
    log_alpha = gate.log_alpha(tokens)
    gate.eval()
    hard, _ = gate(tokens)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard, (log_alpha > 0).float())
    gate.train()
    torch.manual_seed(0)
    soft, _ = gate(tokens)
    assert ((soft > 0) & (soft < 1)).float().mean() > 0.5
    # the sample by hand: u = 0.25, log_alpha = 0.5, beta 2/3 -> sigmoid((log(1/3) + 0.5) * 1.5)
    expected = 1 / (1 + math.exp(-(math.log(1 / 3) + 0.5) * 1.5))
    assert relaxed_bernoulli(torch.tensor([0.5]), torch.tensor([0.25]), 2 / 3).item() == pytest.approx(expected)


def test_log_alpha_is_clamped_and_extreme_uniforms_stay_finite_in_fp16():
    gate = HardConcreteGate(4)
    with torch.no_grad():
        gate.proj.bias.fill_(1e4)
    assert gate.log_alpha(torch.randn(2, 3, 4)).max().item() == 10.0
    log_alpha = torch.tensor([-10.0, 10.0, 0.0, 0.0], dtype=torch.float16, requires_grad=True)
    u = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float16)
    r = relaxed_bernoulli(log_alpha, u, 2 / 3)
    r.half().sum().backward()
    assert torch.isfinite(r).all() and torch.isfinite(log_alpha.grad).all()
    # u clamped to 1e-6: sigmoid(1.5 * log(1e-6 / (1 - 1e-6))) = 1e-9, not the 0 that u = 0 gives
    assert r[2].item() == pytest.approx(1e-9, rel=1e-3)
    assert r[3].item() == pytest.approx(1.0)


@pytest.mark.parametrize("location", ["attn", "skip", "post"])
def test_gating_inside_a_block_matches_the_manual_computation(location):
    enc = _encoder()
    model = GatedViT(enc, gate_layer=0, gate_location=location, mask_position=False).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.gate.proj.bias.fill_(1e3)  # all open: the plain encoder
        assert torch.allclose(model(images)[0], enc(images), atol=1e-6)
        model.gate.proj.bias.fill_(-1e3)  # all closed: the gated quantity becomes the mask token
        out, gates, _ = model(images)
        assert gates.sum() == 0
        m = model.mask_token
        x = enc.embed(images)
        block = enc.blocks[0]
        if location == "attn":
            x = x + m
            x = x + block.mlp_branch(x)
        elif location == "skip":
            x = m.expand_as(x)
            x = x + block.mlp_branch(x)
        else:
            x = m.expand_as(x)
        expected = enc.norm(enc.blocks[1](x))
    assert torch.allclose(out, expected, atol=1e-6)


def test_final_token_gating_with_mask_position():
    enc = _encoder()
    model = GatedViT(enc, mask_position=True).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.gate.proj.bias.fill_(-1e3)
        out, _, _ = model(images)
    assert torch.allclose(out, (model.mask_token + enc.pos_embed).expand(2, -1, -1))


def test_objective_loss_metrics_gradients_and_eval_modes():
    obj = GatedObjective(GatedConfig(lambda_gates=0.5, gate_exp_alpha=2.0))
    nets = obj.build_networks(_encoder(), pred_depth=1, pred_emb_dim=8)
    nets.update(obj.ema_networks(nets))
    assert set(nets) == {"student", "predictor", "target_encoder"}
    assert all(not p.requires_grad for p in nets["target_encoder"].parameters())
    images = torch.randn(3, 3, 16, 16)
    loss, metrics = obj(nets, {"images": images})
    assert set(metrics) == set(obj.metric_names)
    assert loss.item() == pytest.approx((metrics["pred_loss"] + metrics["gate_penalty"]).item(), rel=1e-6)
    assert 0 < metrics["open_frac"].item() < 1
    loss.backward()
    assert nets["student"].gate.proj.weight.grad.abs().sum() > 0
    assert nets["predictor"].predictor_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in nets["target_encoder"].parameters())
    for net in nets.values():
        net.eval()
    gated = obj.features(nets, images, "gated")
    all_open = obj.features(nets, images, "all_open")
    expected = nets["predictor"](nets["student"].encoder(images))
    assert torch.allclose(all_open, F.layer_norm(expected, (16,)), atol=1e-6)
    assert gated.shape == all_open.shape == (3, 4, 16)
    with pytest.raises(UserError, match="gated.gate_layer=5"):
        GatedObjective(GatedConfig(gate_layer=5)).build_networks(_encoder())
    with pytest.raises(UserError, match="gate_location='pre'"):
        GatedConfig(gate_location="pre")
