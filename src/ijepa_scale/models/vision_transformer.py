"""ViT encoder and I-JEPA predictor, state-dict compatible with the official release.

Module and parameter names match facebookresearch/ijepa exactly, so the released checkpoints
load with ``strict=True`` once the DDP ``module.`` prefix is stripped (see
:mod:`ijepa_scale.weights.load`). Differences from the official code, none of which change the
computed function or the state dict:

* attention goes through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
  where available; bfloat16/float16 on CPU computes it explicitly, see :func:`explicit_attention`)
  and returns no attention map;
* the constructors apply the *effective* official initialisation in one pass (see
  :func:`init_weights_as_official`);
* inputs whose patch grid differs from the training grid get a bicubically resized position
  table (the official resize assumes a CLS token and breaks);
* dropout / drop-path are not implemented (every official config sets them to 0).

Nothing here touches distributed state, so the modules can be built on the meta device and
wrapped (FSDP, activation checkpointing, ``torch.compile``) from outside.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import apply_masks, repeat_interleave_batch

LAYER_NORM_EPS = 1e-6

# Official size table: name -> architecture. ``mlp_ratio`` is applied as int(dim * ratio).
VIT_SIZES: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
    "vit_giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
}

VIT_EMBED_DIMS: dict[str, int] = {name: cfg["embed_dim"] for name, cfg in VIT_SIZES.items()}

MaskArg = torch.Tensor | Sequence[torch.Tensor] | None


# --------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------
def _sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] as ``[sin(p * w_k) for k] ++ [cos(p * w_k) for k]``."""
    half = embed_dim // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64, device="cpu") / half))
    angles = positions.to(torch.float64).reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table, [grid_size**2, embed_dim] float32 on CPU, no CLS row.

    Token ``n = row * grid_size + col`` (raster order, as produced by the patch conv).
    Channels ``[:D/2]`` encode the **column** index and ``[D/2:]`` the **row** index; this
    is the (easy to get backwards) order of the official table, so released ``pos_embed``
    tensors equal ours. Computed in float64 and rounded once, like the official numpy code.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    if grid_size <= 0:
        raise ValueError(f"grid_size must be positive, got {grid_size}")
    coords = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    rows = coords.repeat_interleave(grid_size)  # row index of token n
    cols = coords.repeat(grid_size)  # column index of token n
    table = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    return table.float()


def _grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"num_patches must be a perfect square, got {num_patches}")
    return side


def _fixed_pos_embed(num_patches: int, dim: int) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(1, num_patches, dim), requires_grad=False)
    _fill_sincos_(param)
    return param


@torch.no_grad()
def _fill_sincos_(param: torch.Tensor) -> None:
    # Computed on CPU and copied in. On the meta device the copy is a no-op; call
    # init_weights_as_official after ``to_empty`` (or load a state dict) to fill it.
    _, num_patches, dim = param.shape
    param.copy_(get_2d_sincos_pos_embed(dim, _grid_side(num_patches)).unsqueeze(0))


def _resize_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubically resample a square [1, G*G, D] table to a (h, w) grid."""
    side = _grid_side(pos_embed.shape[1])
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=grid_hw, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], dim).to(pos_embed.dtype)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


LOW_PRECISION = (torch.bfloat16, torch.float16)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v with the score matrix materialised, as the official code computes it.

    Used for bfloat16/float16 on CPU, where SDPA's fused kernel has a slow backward (5-10x its float32 time
    at 16-64 tokens, measured in docs/benchmarks.md) while these batched matmuls run on the bf16 units."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed with SDPA (explicitly for low precision
    on CPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # qkv output features are laid out as [3, heads, head_dim]; this must match the
        # official layout for released weights to mean the same thing.
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if q.device.type == "cpu" and q.dtype in LOW_PRECISION:
            out = explicit_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # default scale = head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        # int() truncation as upstream: ViT-g gets int(1408 * 48/11) = 6144.
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The attention residual branch alone (what ``forward`` adds to ``x`` first)."""
        return self.attn(self.norm1(x))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP residual branch alone (what ``forward`` adds second)."""
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, attn_hook=None, residual_hook=None) -> torch.Tensor:
        """``attn_hook`` maps the attention branch before it is added, ``residual_hook`` the sum before the
        MLP (the gated student's gates); inside ``forward`` so wrappers (FSDP, checkpointing) see one call."""
        branch = self.attn_branch(x)
        if attn_hook is not None:
            branch = attn_hook(branch)
        x = x + branch
        if residual_hook is not None:
            x = residual_hook(x)
        return x + self.mlp_branch(x)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def init_weights_as_official(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Apply the effective initialisation of an official I-JEPA run, in place.

    Upstream initialises inside each model (with a depth-wise rescale of ``attn.proj`` and
    ``mlp.fc2``) and then ``helper.init_model`` re-initialises every Linear and LayerNorm,
    which undoes the rescale. The net result, reproduced here in one pass:

    * every ``nn.Linear`` and ``nn.Conv2d``: weight ~ trunc-normal(0, std) cut at +-2
      (absolute, so in practice untruncated), bias 0;
    * every ``nn.LayerNorm``: weight 1, bias 0;
    * the predictor's ``mask_token``: trunc-normal(0, std);
    * the fixed ``pos_embed`` / ``predictor_pos_embed`` are (re)filled with their sin-cos
      values.

    The constructors of :class:`VisionTransformer` and :class:`VisionTransformerPredictor`
    call this already. It is public for models built on the meta device: after
    ``model.to_empty(device=...)`` (possibly inside a wrapper) one call makes every
    parameter valid. Only the distribution matches upstream, not the RNG stream.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, VisionTransformer):
            _fill_sincos_(m.pos_embed)
        elif isinstance(m, VisionTransformerPredictor):
            nn.init.trunc_normal_(m.mask_token, std=std)
            _fill_sincos_(m.predictor_pos_embed)
    return module


def _normalise_img_size(img_size: int | Sequence[int]) -> int:
    if isinstance(img_size, int):
        return img_size
    sizes = [int(s) for s in img_size]
    if len(sizes) == 0 or len(set(sizes)) != 1:
        raise ValueError(f"only square inputs are supported, got img_size={img_size!r}")
    return sizes[0]


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """ViT encoder without CLS token; output is the final-normed patch tokens [B', K, D]."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        img_size = _normalise_img_size(img_size)
        if patch_size <= 0 or img_size < patch_size:
            raise ValueError(f"need 0 < patch_size <= img_size, got {patch_size=}, {img_size=}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.init_std = init_std
        self.grid_size = img_size // patch_size

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = _fixed_pos_embed(self.num_patches, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        init_weights_as_official(self, std=init_std)

    def _pos_embed_for(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        if grid_hw == (self.grid_size, self.grid_size):
            return self.pos_embed
        return _resize_pos_embed(self.pos_embed, grid_hw)

    def forward(self, x: torch.Tensor, masks: MaskArg = None) -> torch.Tensor:
        """Encode images ``x`` [B, C, H, W].

        ``masks``: None (all tokens), a LongTensor [B, K] or a list of them. With masks the
        output is ``[len(masks) * B, K, D]``, mask-major (see :func:`apply_masks`).
        """
        x = self.embed(x, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def embed(self, x: torch.Tensor, masks: MaskArg = None) -> torch.Tensor:
        """Patch tokens plus positions, masked like ``forward``: the input of ``blocks[0]``.

        ``forward(x, masks) == norm(blocks[-1](...blocks[0](embed(x, masks))))``, so callers can run
        the blocks one by one (e.g. to act between them).
        """
        grid_hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.patch_embed(x)
        x = x + self._pos_embed_for(grid_hw)
        if masks is not None:
            x = apply_masks(x, masks)
        return x


# --------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------
class VisionTransformerPredictor(nn.Module):
    """Narrow ViT that predicts target-token features from context tokens."""

    def __init__(
        self,
        num_patches: int,
        embed_dim: int = 768,
        predictor_embed_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        if predictor_embed_dim % num_heads != 0:
            raise ValueError(
                f"predictor_embed_dim {predictor_embed_dim} is not divisible by "
                f"num_heads {num_heads}"
            )
        self.num_patches = num_patches
        self.embed_dim = embed_dim
        self.predictor_embed_dim = predictor_embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.init_std = init_std

        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.predictor_pos_embed = _fixed_pos_embed(num_patches, predictor_embed_dim)
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
            for _ in range(depth)
        )
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        init_weights_as_official(self, std=init_std)

    def forward(
        self,
        x: torch.Tensor,
        masks_x: torch.Tensor | Sequence[torch.Tensor],
        masks: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Predict target features.

        Args:
            x: context tokens from the encoder, [nenc * B, Kc, D] (mask-major).
            masks_x: the nenc context masks used to produce ``x`` (LongTensor [B, Kc] or list).
            masks: the npred target masks (LongTensor [B, Kt] or list).

        Returns:
            [npred * nenc * B, Kt, D], ordered target-mask-major, then context mask, then
            image, matching ``repeat_interleave_batch(apply_masks(h, masks), B, nenc)``.
        """
        if masks_x is None or masks is None:
            raise ValueError("the predictor needs both context masks and target masks")
        masks_x = [masks_x] if isinstance(masks_x, torch.Tensor) else list(masks_x)
        masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
        nenc, npred = len(masks_x), len(masks)
        if nenc == 0 or npred == 0 or x.shape[0] % nenc != 0:
            raise ValueError(
                f"x has {x.shape[0]} rows, which must be a positive multiple of "
                f"len(masks_x)={nenc}; masks must be non-empty"
            )
        batch = x.shape[0] // nenc

        pos = self.predictor_pos_embed.expand(batch, -1, -1)
        ctx = self.predictor_embed(x) + apply_masks(pos, masks_x)
        num_ctx = ctx.shape[1]

        target_pos = repeat_interleave_batch(apply_masks(pos, masks), batch, repeat=nenc)
        queries = target_pos + self.mask_token

        tokens = torch.cat([ctx.repeat(npred, 1, 1), queries], dim=1)
        for block in self.predictor_blocks:
            tokens = block(tokens)
        tokens = self.predictor_norm(tokens)
        return self.predictor_proj(tokens[:, num_ctx:])


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------
def _make_factory(name: str):
    def factory(patch_size: int = 16, **kwargs) -> VisionTransformer:
        return VisionTransformer(patch_size=patch_size, **{**VIT_SIZES[name], **kwargs})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (
        f"Official {name} encoder ({VIT_SIZES[name]}); keyword arguments go to "
        "VisionTransformer and may override the size."
    )
    return factory


vit_tiny = _make_factory("vit_tiny")
vit_small = _make_factory("vit_small")
vit_base = _make_factory("vit_base")
vit_large = _make_factory("vit_large")
vit_huge = _make_factory("vit_huge")
vit_giant = _make_factory("vit_giant")


def vit_predictor(**kwargs) -> VisionTransformerPredictor:
    """Official predictor factory (mlp_ratio 4, qkv bias); kwargs go to the constructor."""
    kwargs.setdefault("mlp_ratio", 4.0)
    kwargs.setdefault("qkv_bias", True)
    return VisionTransformerPredictor(**kwargs)
