"""Modules of Gated I-JEPA: a per-token relaxed-Bernoulli gate, a ViT whose tokens pass through it, and
a predictor over whole token sequences.

Each is a plain module whose ``forward`` does all its work, so DDP/FSDP wrappers see every call.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .vision_transformer import LAYER_NORM_EPS, Block, VisionTransformer, init_weights_as_official

GATE_LOCATIONS = ("attn", "skip", "post")
LOG_ALPHA_LIMIT = 10.0
# Uniform samples are kept this far from 0 and 1: log(u) - log(1 - u) is then finite in every dtype.
UNIFORM_MARGIN = 1e-6


def relaxed_bernoulli(log_alpha: torch.Tensor, uniform: torch.Tensor, beta: float) -> torch.Tensor:
    """sigmoid((log u - log(1 - u) + log_alpha) / beta), with u clamped, computed in float32."""
    u = uniform.float().clamp(UNIFORM_MARGIN, 1.0 - UNIFORM_MARGIN)
    return torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / beta)


class HardConcreteGate(nn.Module):
    """LN + Linear(D, 1) -> log_alpha per token (clamped to [-10, 10]) -> gate in [0, 1].

    Training: a relaxed Bernoulli sample at temperature ``beta`` (a binary Concrete; like the original,
    no stretch to [gamma, zeta]). Eval: hard gates, 1 where sigmoid(log_alpha) > 0.5.
    """

    def __init__(self, dim: int, beta: float = 2 / 3):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"gate temperature beta must be positive, got {beta}")
        self.beta = beta
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Linear(dim, 1)

    def log_alpha(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens)).squeeze(-1).float().clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)

    def forward(self, tokens: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, D] -> (gates [B, N] float32, log_alpha [B, N] float32); ``noise``: the uniform samples
        [B, N] of a training step (drawn here from the global RNG when not given)."""
        log_alpha = self.log_alpha(tokens)
        if self.training:
            uniform = torch.rand_like(log_alpha) if noise is None else noise.to(log_alpha.device, log_alpha.dtype)
            gates = relaxed_bernoulli(log_alpha, uniform, self.beta)
        else:
            gates = (log_alpha > 0).float()
        return gates, log_alpha


class GatedViT(nn.Module):
    """A ViT encoder whose tokens are gated: c = r * s + (1 - r) * mask_token at one place.

    ``gate_layer`` None gates the final (normed) tokens; k gates inside block k at ``gate_location``:
    ``attn`` the attention branch before its residual add, ``skip`` the sum after it, ``post`` the block's
    output. The remaining blocks and the final norm then run on the gated sequence.
    ``mask_position`` adds the encoder's position table to the mask token, so closed tokens keep their
    place (the original adds none, and every fully closed token looks the same to the predictor).
    """

    def __init__(self, encoder: VisionTransformer, beta: float = 2 / 3, gate_layer: int | None = None,
                 gate_location: str = "post", mask_position: bool = True, init_std: float = 0.02):
        super().__init__()
        if gate_location not in GATE_LOCATIONS:
            raise ValueError(f"gate_location={gate_location!r} is not one of {', '.join(GATE_LOCATIONS)}")
        if gate_layer is not None and not 0 <= gate_layer < len(encoder.blocks):
            raise ValueError(f"gate_layer={gate_layer} is outside the encoder's blocks 0..{len(encoder.blocks) - 1}")
        self.encoder = encoder
        self.gate = HardConcreteGate(encoder.embed_dim, beta)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        self.gate_layer = gate_layer
        self.gate_location = gate_location
        self.mask_position = mask_position
        init_weights_as_official(self.gate, std=init_std)
        nn.init.trunc_normal_(self.mask_token, std=init_std)

    def _mix(self, tokens: torch.Tensor, images: torch.Tensor, forced: torch.Tensor | None = None,
             noise: torch.Tensor | None = None):
        gates, log_alpha = self.gate(tokens, noise)
        if forced is not None:
            gates = forced.float()
        fill = self.mask_token
        if self.mask_position:
            grid_hw = (images.shape[-2] // self.encoder.patch_size, images.shape[-1] // self.encoder.patch_size)
            fill = fill + self.encoder._pos_embed_for(grid_hw)
        r = gates.to(tokens.dtype).unsqueeze(-1)
        return r * tokens + (1 - r) * fill.to(tokens.dtype), gates, log_alpha

    def forward(self, images: torch.Tensor, gated: bool = True, gates: torch.Tensor | None = None,
                generator: torch.Generator | None = None):
        """images [B, C, H, W] -> (tokens [B, N, D], gates [B, N], log_alpha [B, N]).

        ``gated=False`` returns the plain encoder tokens (the ``all_open`` evaluation; gates and
        log_alpha are then None). ``gates`` [B, N] replaces the gate's own values (ablations).
        ``generator`` draws the gate noise (a per-step generator makes it independent of anything else
        that uses the global RNG, so a resumed run draws the same noise).
        """
        noise = None
        if generator is not None and self.training and gated:
            side = self.encoder.patch_size
            noise = torch.rand(len(images), (images.shape[-2] // side) * (images.shape[-1] // side),
                               generator=generator).to(images.device)
        if not gated:
            return self.encoder(images), None, None
        if self.gate_layer is None:
            return self._mix(self.encoder(images), images, gates, noise)
        x = self.encoder.embed(images)
        for index, block in enumerate(self.encoder.blocks):
            if index != self.gate_layer:
                x = block(x)
                continue
            if self.gate_location == "post":
                x, gates, log_alpha = self._mix(block(x), images, gates, noise)
                continue
            out = {}

            def gate(tokens, forced=gates):
                mixed, out["gates"], out["log_alpha"] = self._mix(tokens, images, forced, noise)
                return mixed

            # Through the block's own forward, so FSDP gathers its weights (attn: gates on the attention
            # branch; skip: gates on the residual stream after attention).
            x = block(x, **{"attn_hook" if self.gate_location == "attn" else "residual_hook": gate})
            gates, log_alpha = out["gates"], out["log_alpha"]
        return self.encoder.norm(x), gates, log_alpha


class TokenPredictor(nn.Module):
    """Transformer over a whole token sequence [B, N, D] -> [B, N, D] (in/out projections to its width)."""

    def __init__(self, embed_dim: int, predictor_embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, init_std: float = 0.02):
        super().__init__()
        if predictor_embed_dim % num_heads != 0:
            raise ValueError(f"predictor_embed_dim {predictor_embed_dim} is not divisible by num_heads {num_heads}")
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.predictor_blocks = nn.ModuleList(Block(predictor_embed_dim, num_heads, mlp_ratio=mlp_ratio)
                                              for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        init_weights_as_official(self, std=init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.predictor_embed(tokens)
        for block in self.predictor_blocks:
            x = block(x)
        return self.predictor_proj(self.predictor_norm(x))
