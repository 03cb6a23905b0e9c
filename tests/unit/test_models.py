"""Tests for ijepa_scale.models: official key names, shapes, init and numerics."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ijepa_scale.models as models
from ijepa_scale.models import (
    VIT_EMBED_DIMS,
    VIT_SIZES,
    VisionTransformer,
    apply_masks,
    build_encoder,
    build_predictor,
    get_2d_sincos_pos_embed,
    init_weights_as_official,
    repeat_interleave_batch,
)

# name -> (embed_dim, depth, heads, mlp hidden), written out from the official table.
OFFICIAL_TABLE = {
    "vit_tiny": (192, 12, 3, 768),
    "vit_small": (384, 12, 6, 1536),
    "vit_base": (768, 12, 12, 3072),
    "vit_large": (1024, 24, 16, 4096),
    "vit_huge": (1280, 32, 16, 5120),
    "vit_giant": (1408, 40, 16, 6144),
}


# --------------------------------------------------------------------------------------------
# Import hygiene
# --------------------------------------------------------------------------------------------
FORBIDDEN_MODULES = ("torch.distributed.fsdp", "submitit", "webdataset", "fsspec")


def test_models_package_imports_no_distributed_or_io_libraries():
    code = (
        "import sys, ijepa_scale.models\n"
        f"bad = [m for m in {FORBIDDEN_MODULES!r} if m in sys.modules]\n"
        "print('LOADED:' + ','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "LOADED:\n" in result.stdout, result.stdout


def test_models_package_source_has_no_forbidden_imports():
    package_dir = Path(models.__file__).parent
    pattern = re.compile(
        r"^\s*(from|import)\s+(torch\.distributed|submitit|webdataset|fsspec)\b", re.M
    )
    sources = sorted(package_dir.glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "vision_transformer.py", "utils.py"}
    offenders = [p.name for p in sources if pattern.search(p.read_text())]
    assert offenders == []


# --------------------------------------------------------------------------------------------
# Size table, keys and shapes (meta device: no memory)
# --------------------------------------------------------------------------------------------
def test_size_table_matches_official():
    assert list(VIT_SIZES) == list(OFFICIAL_TABLE)
    for name, (dim, depth, heads, hidden) in OFFICIAL_TABLE.items():
        cfg = VIT_SIZES[name]
        assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == (dim, depth, heads)
        assert int(dim * cfg["mlp_ratio"]) == hidden
        assert VIT_EMBED_DIMS[name] == dim


def expected_encoder_shapes(dim, depth, hidden, patch, num_patches, in_chans=3):
    shapes = {
        "pos_embed": (1, num_patches, dim),
        "patch_embed.proj.weight": (dim, in_chans, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (hidden, dim), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (dim, hidden), p + "mlp.fc2.bias": (dim,),
        })
    return shapes


def expected_predictor_shapes(dim, pdim, depth, num_patches):
    shapes = {
        "mask_token": (1, 1, pdim),
        "predictor_pos_embed": (1, num_patches, pdim),
        "predictor_embed.weight": (pdim, dim),
        "predictor_embed.bias": (pdim,),
        "predictor_norm.weight": (pdim,),
        "predictor_norm.bias": (pdim,),
        "predictor_proj.weight": (dim, pdim),
        "predictor_proj.bias": (dim,),
    }
    for i in range(depth):
        p = f"predictor_blocks.{i}."
        shapes.update({
            p + "norm1.weight": (pdim,), p + "norm1.bias": (pdim,),
            p + "attn.qkv.weight": (3 * pdim, pdim), p + "attn.qkv.bias": (3 * pdim,),
            p + "attn.proj.weight": (pdim, pdim), p + "attn.proj.bias": (pdim,),
            p + "norm2.weight": (pdim,), p + "norm2.bias": (pdim,),
            p + "mlp.fc1.weight": (4 * pdim, pdim), p + "mlp.fc1.bias": (4 * pdim,),
            p + "mlp.fc2.weight": (pdim, 4 * pdim), p + "mlp.fc2.bias": (pdim,),
        })
    return shapes


def shapes_of(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", list(OFFICIAL_TABLE))
@pytest.mark.parametrize("img_size,patch", [(224, 16), (224, 14)])
def test_encoder_state_dict_keys_and_shapes(name, img_size, patch):
    dim, depth, heads, hidden = OFFICIAL_TABLE[name]
    with torch.device("meta"):
        enc = build_encoder(name, img_size, patch)
        factory_enc = getattr(models, name)(patch_size=patch, img_size=[img_size])
    num_patches = (img_size // patch) ** 2
    expected = expected_encoder_shapes(dim, depth, hidden, patch, num_patches)
    assert shapes_of(enc) == expected
    assert shapes_of(factory_enc) == expected
    assert (enc.embed_dim, enc.num_heads, enc.patch_size, enc.num_patches) == (
        dim, heads, patch, num_patches)
    assert isinstance(enc.blocks, torch.nn.ModuleList) and len(enc.blocks) == depth
    assert enc.pos_embed.requires_grad is False
    assert all(m.eps == 1e-6 for m in enc.modules() if isinstance(m, torch.nn.LayerNorm))


@pytest.mark.parametrize(
    "name,patch,img,pred_depth,n",
    [
        ("vit_huge", 14, 224, 12, 256),
        ("vit_huge", 16, 448, 12, 784),
        ("vit_giant", 16, 224, 16, 196),
    ],
)
def test_released_configs_predictor_keys_and_heads(name, patch, img, pred_depth, n):
    with torch.device("meta"):
        enc = build_encoder(name, img, patch)
        pred = build_predictor(enc, pred_depth=pred_depth, pred_emb_dim=384)
    assert enc.num_patches == n
    assert shapes_of(pred) == expected_predictor_shapes(enc.embed_dim, 384, pred_depth, n)
    assert pred.num_heads == enc.num_heads == 16
    assert all(b.attn.head_dim == 24 for b in pred.predictor_blocks)
    assert pred.predictor_pos_embed.requires_grad is False
    assert pred.mask_token.requires_grad is True


def test_vit_huge_parameter_count():
    dim, depth, hidden, patch, n = 1280, 32, 5120, 14, 256
    per_block = (
        4 * dim  # two LayerNorms
        + 3 * dim * dim + 3 * dim  # qkv
        + dim * dim + dim  # proj
        + hidden * dim + hidden + dim * hidden + dim  # mlp
    )
    expected = 3 * patch * patch * dim + dim + n * dim + depth * per_block + 2 * dim
    with torch.device("meta"):
        enc = build_encoder("vit_huge", 224, 14)
    total = sum(p.numel() for p in enc.parameters())
    trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert total == expected
    assert trainable == expected - n * dim  # pos_embed is frozen
    assert 625e6 < total < 640e6


def test_build_encoder_overrides_and_errors():
    enc = build_encoder("vit_small", 32, 8, embed_dim=48, depth=2, num_heads=4)
    assert (enc.embed_dim, len(enc.blocks), enc.num_heads, enc.num_patches) == (48, 2, 4, 16)
    assert enc.blocks[0].mlp.fc1.out_features == 192
    with pytest.raises(ValueError, match="vit_tiny.*vit_giant"):
        build_encoder("vit_enormous", 224, 16)
    with pytest.raises(ValueError, match="divisible"):
        build_encoder("vit_tiny", 224, 16, embed_dim=100)  # 3 heads
    with pytest.raises(ValueError, match="divisible"):
        build_predictor(enc, pred_depth=1, pred_emb_dim=30)  # 4 heads
    with pytest.raises(ValueError, match="square"):
        VisionTransformer(img_size=[224, 192], patch_size=16)
    assert VisionTransformer(img_size=[32], patch_size=8, embed_dim=32, depth=1,
                             num_heads=2).num_patches == 16


# --------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------
def numpy_sincos_table(dim, grid):
    """Independent computation: channels [col sin | col cos | row sin | row cos]."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    rows, cols = rows.reshape(-1, 1).astype(np.float64), cols.reshape(-1, 1).astype(np.float64)
    return np.concatenate(
        [np.sin(cols * omega), np.cos(cols * omega), np.sin(rows * omega), np.cos(rows * omega)],
        axis=1,
    ).astype(np.float32)


@pytest.mark.parametrize("dim,grid", [(192, 14), (384, 16), (64, 5)])
def test_pos_embed_matches_numpy(dim, grid):
    table = get_2d_sincos_pos_embed(dim, grid)
    assert table.shape == (grid * grid, dim) and table.dtype == torch.float32
    np.testing.assert_allclose(table.numpy(), numpy_sincos_table(dim, grid), atol=1e-6, rtol=0)


def test_pos_embed_half_structure():
    dim, grid = 64, 6
    table = get_2d_sincos_pos_embed(dim, grid).reshape(grid, grid, dim)  # [row, col, D]
    half, quarter = dim // 2, dim // 4
    # Token (0, 0): sin terms 0, cos terms 1.
    expected_origin = torch.cat([torch.zeros(quarter), torch.ones(quarter)] * 2)
    torch.testing.assert_close(table[0, 0], expected_origin, atol=1e-7, rtol=0)
    # First half depends only on the column, second half only on the row.
    assert torch.equal(table[:, :, :half], table[:1, :, :half].expand(grid, -1, -1))
    assert torch.equal(table[:, :, half:], table[:, :1, half:].expand(-1, grid, -1))
    assert not torch.equal(table[0, 1, :half], table[0, 0, :half])
    # Lowest frequency is 1 rad per step: token (row 2, col 3).
    assert table[2, 3, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    assert table[2, 3, half].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert table[2, 3, half + quarter].item() == pytest.approx(math.cos(2.0), abs=1e-6)


def test_models_carry_the_sincos_tables():
    enc = build_encoder("vit_tiny", 48, 8, depth=1)
    pred = build_predictor(enc, pred_depth=1, pred_emb_dim=96)
    assert torch.equal(enc.pos_embed[0], get_2d_sincos_pos_embed(192, 6))
    assert torch.equal(pred.predictor_pos_embed[0], get_2d_sincos_pos_embed(96, 6))


# --------------------------------------------------------------------------------------------
# Mask helpers
# --------------------------------------------------------------------------------------------
def test_apply_masks_values():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    m1 = torch.tensor([[0, 4], [1, 2]])
    m2 = torch.tensor([[3, 3], [0, 1]])
    out = apply_masks(x, [m1, m2])
    expected = torch.stack([x[0, [0, 4]], x[1, [1, 2]], x[0, [3, 3]], x[1, [0, 1]]])
    assert torch.equal(out, expected)
    assert torch.equal(apply_masks(x, m1), expected[:2])
    with pytest.raises(ValueError):
        apply_masks(x, [torch.zeros(3, 2, dtype=torch.long)])


def test_repeat_interleave_batch_values():
    x = torch.arange(6).reshape(6, 1)  # chunks of B=2: [0,1], [2,3], [4,5]
    out = repeat_interleave_batch(x, 2, repeat=2)
    assert out.flatten().tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]
    assert torch.equal(repeat_interleave_batch(x, 2, repeat=1), x)
    with pytest.raises(ValueError):
        repeat_interleave_batch(x, 4, repeat=2)


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------
def test_initialisation_is_effective_official():
    torch.manual_seed(0)
    enc = build_encoder("vit_small", 64, 8, depth=6)
    pred = build_predictor(enc, pred_depth=6, pred_emb_dim=192)
    for model in (enc, pred):
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                assert torch.count_nonzero(m.bias) == 0
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.15)
            elif isinstance(m, torch.nn.LayerNorm):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # No depth-wise rescale survives the official second pass: block 6 would be /sqrt(12).
    assert enc.blocks[-1].attn.proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert enc.blocks[-1].mlp.fc2.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert pred.mask_token.std().item() == pytest.approx(0.02, rel=0.3)
    # Re-initialising redraws weights and keeps the fixed table.
    before = enc.blocks[0].attn.qkv.weight.clone()
    init_weights_as_official(enc)
    assert torch.equal(enc.pos_embed[0], get_2d_sincos_pos_embed(384, 8))
    assert not torch.equal(before, enc.blocks[0].attn.qkv.weight)


def test_meta_build_then_materialise():
    with torch.device("meta"):
        enc = build_encoder("vit_tiny", 32, 8, depth=2)
        pred = build_predictor(enc, pred_depth=2, pred_emb_dim=96)
    for model in (enc, pred):
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        init_weights_as_official(model)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(enc.pos_embed[0], get_2d_sincos_pos_embed(192, 4))
    assert torch.equal(pred.predictor_pos_embed[0], get_2d_sincos_pos_embed(96, 4))
    assert enc.pos_embed.requires_grad is False
    assert pred.mask_token.std().item() == pytest.approx(0.02, rel=0.5)


# --------------------------------------------------------------------------------------------
# Forward shapes
# --------------------------------------------------------------------------------------------
def random_masks(count, batch, keep, num_patches, gen):
    return [
        torch.stack([torch.randperm(num_patches, generator=gen)[:keep] for _ in range(batch)])
        for _ in range(count)
    ]


@pytest.mark.parametrize("nenc", [1, 2])
def test_masked_forward_shapes(nenc):
    gen = torch.Generator().manual_seed(0)
    enc = build_encoder("vit_tiny", 32, 8, depth=2)
    pred = build_predictor(enc, pred_depth=2, pred_emb_dim=96)
    B, npred, kc, kt = 3, 4, 7, 5
    x = torch.randn(B, 3, 32, 32, generator=gen)
    masks_x = random_masks(nenc, B, kc, 16, gen)
    masks = random_masks(npred, B, kt, 16, gen)
    assert enc(x).shape == (B, 16, 192)
    z = enc(x, masks_x)
    assert z.shape == (nenc * B, kc, 192)
    out = pred(z, masks_x, masks)
    assert out.shape == (npred * nenc * B, kt, 192)
    if nenc == 1:  # bare tensors are accepted in place of one-element lists
        assert torch.equal(enc(x, masks_x[0]), z)
        assert torch.equal(pred(z, masks_x[0], masks), out)


def test_predictor_rejects_bad_inputs():
    enc = build_encoder("vit_tiny", 32, 8, depth=1)
    pred = build_predictor(enc, pred_depth=1, pred_emb_dim=96)
    z = torch.randn(3, 4, 192)
    m = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError):
        pred(z, None, m)
    with pytest.raises(ValueError):
        pred(z, [m, m], [m])  # 3 rows is not a multiple of nenc=2


def test_other_resolution_uses_resized_pos_embed():
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", 32, 8, depth=1).eval()
    assert enc(torch.randn(2, 3, 48, 40)).shape == (2, 6 * 5, 192)
    # Resizing to the native grid is (numerically) the identity.
    from ijepa_scale.models.vision_transformer import _resize_pos_embed
    torch.testing.assert_close(_resize_pos_embed(enc.pos_embed, (4, 4)), enc.pos_embed)


# --------------------------------------------------------------------------------------------
# Numerical equivalence with the official explicit attention
# --------------------------------------------------------------------------------------------
def ref_block(x, blk, heads):
    """Pre-norm block with explicit matmul-softmax attention (the upstream formulation)."""
    def ln(t, norm):
        return F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, eps=1e-6)

    B, N, C = x.shape
    h = ln(x, blk.norm1)
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    a = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + a @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h = ln(x, blk.norm2)
    h = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
    return x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def gather_rows(x, mask):
    return x[torch.arange(x.shape[0]).unsqueeze(1), mask]


def ref_encoder(enc, img, masks=None):
    p = enc.patch_size
    B, C, H, W = img.shape
    patches = img.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(B, (H // p) * (W // p), C * p * p)
    x = patches @ enc.patch_embed.proj.weight.reshape(enc.embed_dim, -1).T
    x = x + enc.patch_embed.proj.bias + enc.pos_embed
    if masks is not None:
        x = torch.cat([gather_rows(x, m) for m in masks], dim=0)
    for blk in enc.blocks:
        x = ref_block(x, blk, enc.num_heads)
    return F.layer_norm(x, x.shape[-1:], enc.norm.weight, enc.norm.bias, eps=1e-6)


def ref_predictor(pred, z, masks_x, masks):
    """Loop over (target, context, image) explicitly, building the output in that order."""
    nenc = len(masks_x)
    B = z.shape[0] // nenc
    pos = pred.predictor_pos_embed[0]
    out = []
    for m_t in masks:
        for c, m_c in enumerate(masks_x):
            for b in range(B):
                ctx = z[c * B + b] @ pred.predictor_embed.weight.T + pred.predictor_embed.bias
                ctx = ctx + pos[m_c[b]]
                queries = pred.mask_token[0] + pos[m_t[b]]
                t = torch.cat([ctx, queries], dim=0).unsqueeze(0)
                for blk in pred.predictor_blocks:
                    t = ref_block(t, blk, pred.num_heads)
                t = F.layer_norm(t, t.shape[-1:], pred.predictor_norm.weight,
                                 pred.predictor_norm.bias, eps=1e-6)
                t = t[0, ctx.shape[0]:]
                out.append(t @ pred.predictor_proj.weight.T + pred.predictor_proj.bias)
    return torch.stack(out)


def randomise_(module, gen, std=0.15):
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.mark.parametrize("nenc", [1, 2])
def test_sdpa_matches_explicit_attention(nenc):
    gen = torch.Generator().manual_seed(1)
    enc = build_encoder("vit_tiny", 32, 8, embed_dim=48, depth=2, num_heads=3).eval()
    pred = build_predictor(enc, pred_depth=2, pred_emb_dim=24).eval()
    randomise_(enc, gen)
    randomise_(pred, gen)
    with torch.no_grad():  # LayerNorm gains around 1 so the attention is far from uniform
        for m in list(enc.modules()) + list(pred.modules()):
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(1.0)
    B = 2
    img = torch.randn(B, 3, 32, 32, generator=gen)
    masks_x = random_masks(nenc, B, 6, 16, gen)
    masks = random_masks(4, B, 3, 16, gen)
    with torch.no_grad():
        full = enc(img)
        torch.testing.assert_close(full, ref_encoder(enc, img), atol=1e-5, rtol=1e-5)
        z = enc(img, masks_x)
        torch.testing.assert_close(z, ref_encoder(enc, img, masks_x), atol=1e-5, rtol=1e-5)
        out = pred(z, masks_x, masks)
        torch.testing.assert_close(out, ref_predictor(pred, z, masks_x, masks),
                                   atol=1e-5, rtol=1e-5)
    assert full.std() > 0.5  # the comparison is not between near-zero tensors


def test_predictor_output_lines_up_with_target_layout():
    """Row r of the predictor output must predict the target row r of the training loss."""
    gen = torch.Generator().manual_seed(2)
    enc = build_encoder("vit_tiny", 32, 8, depth=1).eval()
    pred = build_predictor(enc, pred_depth=2, pred_emb_dim=96).eval()
    with torch.no_grad():  # identity blocks: each output depends on its own query only
        for blk in pred.predictor_blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    B, nenc, npred = 2, 2, 3
    masks_x = random_masks(nenc, B, 5, 16, gen)
    masks = random_masks(npred, B, 4, 16, gen)
    z = torch.randn(nenc * B, 5, 192, generator=gen)
    with torch.no_grad():
        out = pred(z, masks_x, masks)
        # Layout of the loss targets: target-mask-major, then context copy, then image.
        h = torch.arange(16.0).reshape(1, 16, 1).expand(B, 16, 1)
        target_idx = repeat_interleave_batch(apply_masks(h, masks), B, repeat=nenc)[..., 0].long()
        expected_idx = torch.stack([masks[t][b] for t in range(npred) for _ in range(nenc)
                                    for b in range(B)])
        assert torch.equal(target_idx, expected_idx)
        queries = pred.mask_token[0] + pred.predictor_pos_embed[0][target_idx]
        expected = pred.predictor_proj(pred.predictor_norm(queries))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_low_precision_attention_on_cpu_is_explicit_and_matches_sdpa(monkeypatch):
    """bfloat16 on CPU bypasses SDPA (its fused kernel's backward is several times slower there) and computes
    the same attention, forward and backward, to bfloat16 precision; float32 keeps SDPA."""
    from ijepa_scale.models import vision_transformer as vt

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 3, 13, 16, generator=gen) for _ in range(3))
    grad = torch.randn(4, 3, 13, 16, generator=gen)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref_inputs).backward(grad)
    low_inputs = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = vt.explicit_attention(*low_inputs)
    out.backward(grad.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v), atol=3e-2, rtol=3e-2)
    for low, ref in zip(low_inputs, ref_inputs):
        torch.testing.assert_close(low.grad.float(), ref.grad, atol=5e-2, rtol=5e-2)

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(vt.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].dtype) or sdpa(*a))
    attn = vt.Attention(48, num_heads=3)
    x = torch.randn(2, 5, 48, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x)
    assert calls == [] and low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), attn(x), atol=3e-2, rtol=3e-2)
    assert calls == [torch.float32]
