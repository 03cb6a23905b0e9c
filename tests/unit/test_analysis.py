"""Analysis pieces: attention maps (checked against the block's own output), overlays, PNG grids, the
correlation dimension of points on manifolds of known dimension, and the Gated I-JEPA gate statistics."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ijepa_scale.evaluation.analysis import (attention_grid, attention_maps, attention_overlay,
                                             correlation_dimension, plot_correlation_dimension, save_image_grid)
from ijepa_scale.models import build_encoder


def test_attention_maps_reproduce_the_blocks_attention_output():
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    images = torch.randn(2, 3, 16, 16)
    maps = attention_maps(enc, images, [1])
    assert set(maps) == {1} and maps[1].shape == (2, 2, 16, 16)
    assert torch.allclose(maps[1].sum(-1), torch.ones(2, 2, 16))
    # maps @ v through the projection must equal the block's attention branch
    x = enc.blocks[0](enc.embed(images))
    block = enc.blocks[1]
    qkv = block.attn.qkv(block.norm1(x)).reshape(2, 16, 3, 2, 8)
    v = qkv.permute(2, 0, 3, 1, 4)[2]
    out = block.attn.proj((maps[1] @ v).transpose(1, 2).reshape(2, 16, 16))
    assert torch.allclose(out, block.attn_branch(x), atol=1e-5)
    with pytest.raises(ValueError, match=r"layers \[2\]"):
        attention_maps(enc, images, [2])


def test_overlay_puts_the_heat_where_key_p_is_attended(tmp_path):
    display = torch.zeros(1, 3, 8, 8)
    maps = torch.zeros(1, 4, 4)  # 2x2 grid of tokens, rows are queries
    maps[0, 0, 3] = 1.0  # the top-left query attends to the bottom-right key
    maps[0, 1:, 1] = 1.0  # every other query attends to the top-right key
    out = attention_overlay(display, maps, patch=3)  # heat at the queries that attend key 3
    assert out[0, 0, 1, 1] == 0.5 and out[0, 0, 6, 6] == 0 and out[0, 1:].abs().sum() == 0
    assert attention_overlay(display, maps, patch=0).sum() == 0  # nobody attends key 0: no heat
    received = attention_overlay(display, maps)  # mean attention received, at the keys
    assert received[0, 0, 1, 6] == 0.5 and received[0, 0, 6, 6] == pytest.approx(0.5 / 3)
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    tiles = attention_grid(enc, torch.randn(3, 3, 16, 16), layers=[0, 1], heads=[0, 1], scale=2)
    assert tiles.shape == (3, 5, 3, 32, 32)
    path = save_image_grid(tiles, tmp_path / "attention.png", pad=2)
    with Image.open(path) as image:
        assert image.size == (5 * 34 + 2, 3 * 34 + 2)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_correlation_dimension_of_flat_manifolds_in_ten_dimensions(dim):
    generator = torch.Generator().manual_seed(dim)
    coords = torch.rand(2000, dim, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(10, dim, generator=generator, dtype=torch.float64))
    points = coords @ basis.T + 5.0
    result = correlation_dimension(points)
    assert result.dimension == pytest.approx(dim, abs=0.1 * dim)
    # the same slope in any base used on both axes
    assert correlation_dimension(points, base=math.e).dimension == pytest.approx(result.dimension, rel=1e-9)


def test_correlation_dimension_plot_and_errors(tmp_path):
    result = correlation_dimension(torch.rand(300, 2, generator=torch.Generator().manual_seed(0)))
    assert len(result.log_radii) == len(result.log_counts) >= 2
    slope = np.polyfit(result.log_radii, result.log_counts, 1)[0]
    assert slope == pytest.approx(result.dimension)
    path = plot_correlation_dimension(result, tmp_path / "corrdim.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 480)
    # min_pairs=1 starts at the smallest distance, as the original
    original = correlation_dimension(torch.rand(300, 2, generator=torch.Generator().manual_seed(0)), min_pairs=1)
    assert original.log_radii[0] < result.log_radii[0]
    with pytest.raises(ValueError, match="coincide"):
        correlation_dimension(torch.ones(5, 3))


def test_gate_map_summary_and_closed_token_loss_by_hand(tmp_path):
    from ijepa_scale.evaluation.analysis import closed_token_loss, gate_map_summary, save_heat_map
    grid = torch.zeros(4, 4)
    grid[1:3, 1:3] = 1.0
    grid[0, 0] = 0.5
    summary = gate_map_summary(torch.stack([grid.flatten(), grid.flatten()]))
    assert summary["centre_mean"] == 1.0 and summary["corner_mean"] == pytest.approx(0.5 / 4)
    assert torch.equal(summary["map"], grid)
    with Image.open(save_heat_map(summary["map"], tmp_path / "gates.png", scale=8)) as image:
        assert image.size == (32, 32) and image.getpixel((12, 12)) == 255 and image.getpixel((0, 0)) == 128
    p = torch.zeros(2, 2, 1)
    t = torch.tensor([[[1.0], [2.0]], [[3.0], [0.0]]])
    gates = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # image 0: only token 1 is closed -> 4; image 1: both closed -> (9 + 0) / 2
    assert closed_token_loss(p, t, gates).item() == pytest.approx((4 + 4.5) / 2, rel=1e-5)


def test_gate_ablation_and_noise_statistics_on_a_small_gated_model():
    from ijepa_scale.evaluation.analysis import gate_ablation, open_fraction_real_vs_noise
    from ijepa_scale.objectives.gated import GatedObjective
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    nets = GatedObjective().build_networks(enc, pred_depth=1, pred_emb_dim=8)
    student, predictor, teacher = nets["student"].eval(), nets["predictor"].eval(), copy.deepcopy(enc).eval()
    images = torch.randn(3, 3, 16, 16)
    norm = lambda x: F.layer_norm(x, (16,))
    target = norm(teacher(images))
    with torch.no_grad():
        student.gate.proj.bias.fill_(-1e3)  # every gate closed
        result = gate_ablation(student, predictor, teacher, images, torch.Generator().manual_seed(0))
        closed_tokens, _, _ = student(images)
        expected = (norm(predictor(closed_tokens)) - target).pow(2).sum(-1).mean().item()
        all_open = (norm(predictor(enc(images))) - target).pow(2).sum(-1).mean().item()
        # forced gates replace the gate's own
        assert torch.allclose(student(images, gates=torch.ones(3, 4))[0], enc(images), atol=1e-6)
    assert result["learned"] == pytest.approx(expected, rel=1e-4)
    assert result["random"] == pytest.approx(expected, rel=1e-4)  # open rate ~0: random gates all closed
    assert result["all_open"] == pytest.approx(all_open, rel=1e-5)
    assert result["learned_open_fraction"] == 0.0
    stats = open_fraction_real_vs_noise(student, images, torch.Generator().manual_seed(0))
    assert stats["real"].shape == stats["noise"].shape == (3,)
    assert stats["real"].max() < 1e-3
