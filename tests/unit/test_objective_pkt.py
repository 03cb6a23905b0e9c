"""PKT objective: kernel and KL against hand computation, both groupings, weights and aliases."""

import math

import pytest
import torch
import torch.nn.functional as F

from ijepa_scale.errors import UserError
from ijepa_scale.objectives.ijepa import METRIC_NAMES, IJEPAObjective
from ijepa_scale.objectives.pkt import (PKTConfig, PKTObjective, group_by_image, pkt_chunk_sum, pkt_divergence,
                                        pkt_kernel, pkt_per_image)
from tests.helpers.tiny_ijepa import tiny_ijepa_batch


def test_kernel_and_divergence_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # orthogonal: cos 0 -> 0.5 off the diagonal
    y = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # parallel: cos 1 -> 1 everywhere
    q = pkt_kernel(x)
    assert torch.allclose(q, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]), atol=1e-6)
    assert torch.allclose(pkt_kernel(y), torch.full((2, 2), 0.5), atol=1e-6)
    # sum over the 4 entries of 0.5*log(0.5/(2/3)) twice and 0.5*log(0.5/(1/3)) twice = log(9/8); mean = /4
    assert pkt_divergence(x, y).item() == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)
    # KL(target || prediction): swapping the arguments gives another number; equal inputs give 0.
    swapped = 2 * (2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.5)) / 4
    assert pkt_divergence(y, x).item() == pytest.approx(swapped, rel=1e-5)
    assert pkt_divergence(x, x).item() == pytest.approx(0.0, abs=1e-7)
    # A zero row stays finite (0 after normalisation, as the original's NaN -> 0).
    assert torch.isfinite(pkt_divergence(torch.zeros(3, 2), y[:1].expand(3, 2))).all()


def test_per_image_grouping_follows_mask_major_rows():
    # B=2 images, 3 target blocks, K=1 token: row m*B + b belongs to image b.
    rows = torch.arange(6.0).reshape(6, 1, 1).expand(6, 1, 2)
    grouped = group_by_image(rows, batch_size=2)
    assert grouped.shape == (2, 3, 2)
    assert grouped[0, :, 0].tolist() == [0.0, 2.0, 4.0]
    assert grouped[1, :, 0].tolist() == [1.0, 3.0, 5.0]
    torch.manual_seed(0)
    z, h = torch.randn(6, 2, 4), torch.randn(6, 2, 4)
    by_hand = (pkt_divergence(torch.cat([z[0], z[2], z[4]]), torch.cat([h[0], h[2], h[4]]))
               + pkt_divergence(torch.cat([z[1], z[3], z[5]]), torch.cat([h[1], h[3], h[5]]))) / 2
    assert pkt_per_image(z, h, batch_size=2).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # The original's view(B, M, ...) grouping takes consecutive rows: a different (mixed-image) number.
    shipped = (pkt_divergence(z[:3].reshape(-1, 4), h[:3].reshape(-1, 4))
               + pkt_divergence(z[3:].reshape(-1, 4), h[3:].reshape(-1, 4))) / 2
    assert abs(shipped.item() - by_hand.item()) > 1e-4


def test_chunks_are_consecutive_rows_in_the_original_order_with_a_short_last_chunk():
    torch.manual_seed(1)
    z, h = torch.randn(5, 1, 3), torch.randn(5, 1, 3)
    total, num_chunks = pkt_chunk_sum(z, h, chunk_rows=2)
    flat_z, flat_h = z.reshape(5, 3), h.reshape(5, 3)
    by_hand = pkt_divergence(flat_z[0:2], flat_h[0:2]) + pkt_divergence(flat_z[2:4], flat_h[2:4])
    # a one-row chunk has P = Q = [1]: PKT 0
    assert pkt_divergence(flat_z[4:], flat_h[4:]).item() == pytest.approx(0.0, abs=1e-7)
    assert total.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert num_chunks == 2.5


def test_chunks_loss_is_the_originals_formula_and_divides_the_l2_term_too():
    torch.manual_seed(2)
    z, h = torch.randn(4, 3, 8), torch.randn(4, 3, 8)  # R = 12 rows
    cfg = PKTConfig.from_loss_name("L2_PKT_chunks", chunk_rows=4)
    assert cfg.grouping == "chunks" and cfg.divide_by_chunks
    loss, terms = PKTObjective(cfg).loss_terms(z, h, batch_size=2)
    flat_z, flat_h = z.reshape(12, 8), h.reshape(12, 8)
    pkt_sum = sum(pkt_divergence(flat_z[i:i + 4], flat_h[i:i + 4]) for i in (0, 4, 8))
    l2 = F.smooth_l1_loss(z, h)
    assert loss.item() == pytest.approx(((pkt_sum + l2) / 3).item(), rel=1e-6)
    assert terms["pkt_loss"].item() == pytest.approx((pkt_sum / 3).item(), rel=1e-6)
    # Explicit weights, no division.
    weighted = PKTObjective(PKTConfig(grouping="chunks", chunk_rows=4, l2_weight=0.5, pkt_weight=3.0))
    loss2, _ = weighted.loss_terms(z, h, batch_size=2)
    assert loss2.item() == pytest.approx((3.0 * pkt_sum + 0.5 * l2).item(), rel=1e-6)


def test_alias_and_weights_of_the_per_image_loss():
    cfg = PKTConfig.from_loss_name("L2_PKT")
    assert (cfg.grouping, cfg.l2_weight, cfg.pkt_weight) == ("image", 1.0, 1.0)
    torch.manual_seed(3)
    z, h = torch.randn(8, 3, 8), torch.randn(8, 3, 8)
    loss, terms = PKTObjective(PKTConfig(l2_weight=2.0, pkt_weight=10.0)).loss_terms(z, h, batch_size=2)
    expected = 2.0 * F.smooth_l1_loss(z, h) + 10.0 * pkt_per_image(z, h, 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(UserError, match="pkt.grouping='rows'"):
        PKTConfig(grouping="rows")
    with pytest.raises(UserError, match="L2_PKT_scaled"):
        PKTConfig.from_loss_name("L2_PKT_scaled")
    with pytest.raises(UserError, match="pkt.pkt_weight=-1"):
        PKTConfig(pkt_weight=-1)


def test_objective_on_models_matches_ijepa_without_the_pkt_term_and_gradients_reach_the_student():
    enc, pred, tgt, images, masks_enc, masks_pred = tiny_ijepa_batch(4)
    plain, _ = IJEPAObjective().losses(enc, pred, tgt, images, masks_enc, masks_pred)
    no_pkt, _ = PKTObjective(PKTConfig(pkt_weight=0.0)).losses(enc, pred, tgt, images, masks_enc, masks_pred)
    assert no_pkt.item() == pytest.approx(plain.item(), rel=1e-6)
    obj = PKTObjective()
    loss, metrics = obj.losses(enc, pred, tgt, images, masks_enc, masks_pred)
    assert obj.metric_names == METRIC_NAMES + ("pred_loss", "pkt_loss")
    assert set(metrics) == set(obj.metric_names)
    assert metrics["pkt_loss"].item() > 0
    assert loss.item() == pytest.approx((metrics["pred_loss"] + metrics["pkt_loss"]).item(), rel=1e-6)
    loss.backward()
    assert pred.predictor_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tgt.parameters())
