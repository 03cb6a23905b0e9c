"""Energy transformer: the energy by hand, its gradient against autograd, and the encoder/predictor contract."""

import math

import pytest
import torch

from ijepa_scale.masks import MultiBlockMaskCollator
from ijepa_scale.models.energy_transformer import EnergyBlock, EnergyPredictor, EnergyTransformer


def test_energy_by_hand():
    block = EnergyBlock(2, num_heads=1, head_dim=1, hidden_dim=1)
    with torch.no_grad():
        block.wq.copy_(torch.tensor([[[1.0, 0.0]]]))
        block.wk.copy_(torch.tensor([[[0.0, 1.0]]]))
        block.betas.fill_(1.0)
        block.memories.copy_(torch.tensor([[1.0], [0.0]]))
        block.hopfield_beta.fill_(1.0)
    g = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    # q = (1, 3), k = (2, 4): scores [[2, 4], [6, 12]]; Hopfield hidden (1, 3)
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))
    expected = -(lse(2, 4) + lse(6, 12)) - 0.5 * (1 + 9)
    assert block.energy(g).item() == pytest.approx(expected, rel=1e-6)
    # halving beta_h: -(1/b) lse(b * scores)
    with torch.no_grad():
        block.betas.fill_(0.5)
    expected_half = -2 * (lse(1, 2) + lse(3, 6)) - 5
    assert block.energy(g).item() == pytest.approx(expected_half, rel=1e-6)


@pytest.mark.parametrize("hopfield", ["relu", "softmax"])
def test_closed_form_gradient_matches_autograd(hopfield):
    torch.manual_seed(0)
    block = EnergyBlock(6, num_heads=2, head_dim=3, hidden_dim=5, hopfield=hopfield, init_std=0.5).double()
    with torch.no_grad():
        block.hopfield_beta.fill_(0.7)
        block.betas.copy_(torch.tensor([0.4, 1.3]))
    g = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    (by_autograd,) = torch.autograd.grad(block.energy(g), g)
    assert by_autograd.abs().max() > 0.1
    assert torch.allclose(block.energy_gradient(g), by_autograd, atol=1e-10)
    # and the block's own autograd path returns the same
    assert torch.allclose(block.autograd_gradient(g.detach()), by_autograd, atol=1e-10)


def _masks(batch):
    coll = MultiBlockMaskCollator(input_size=16, patch_size=4, enc_mask_scale=(0.85, 1.0),
                                  pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=2,
                                  min_keep=2, allow_overlap=False, seed=0)
    return coll.sample(batch, 0)


def _pair(gradient):
    torch.manual_seed(0)
    enc = EnergyTransformer(img_size=16, patch_size=4, embed_dim=8, num_heads=2, hidden_dim=16, steps=2,
                            gradient=gradient)
    pred = EnergyPredictor(enc.num_patches, embed_dim=8, predictor_embed_dim=8, num_heads=2, hidden_dim=16,
                           steps=2, gradient=gradient)
    for module in (enc, pred):  # larger weights than the near-identity init, so the energy terms matter
        with torch.no_grad():
            module.block.wq.normal_(0, 0.3)
            module.block.wk.normal_(0, 0.3)
            module.block.memories.normal_(0, 0.3)
    return enc, pred


def test_encoder_and_predictor_shapes_and_second_order_training_gradients():
    images = torch.randn(3, 3, 16, 16)
    masks_enc, masks_pred = _masks(3)
    results = {}
    for gradient in ("autograd", "analytic"):
        enc, pred = _pair(gradient)
        z = enc(images, masks_enc)
        assert z.shape == (3, masks_enc[0].shape[1], 8)
        out = pred(z, masks_enc, masks_pred)
        assert out.shape == (2 * 3, masks_pred[0].shape[1], 8)
        assert enc(images).shape == (3, 16, 8)
        out.pow(2).mean().backward()
        results[gradient] = (out.detach(), enc.block.wq.grad.clone(), enc.block.betas.grad.clone())
        # the energy parameters only act through dE/dg, so their gradients need create_graph
        assert enc.block.wq.grad.abs().sum() > 0 and enc.block.memories.grad.abs().sum() > 0
        with torch.no_grad():
            assert torch.allclose(enc(images, masks_enc), z, atol=1e-6)
    for a, b in zip(results["autograd"], results["analytic"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
