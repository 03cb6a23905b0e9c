"""Modules of Saccade JEPA: a mean-pooled ViT backbone and the shift-conditioned MLP predictor."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .vision_transformer import VisionTransformer, init_weights_as_official

ROTATION_FREQS = 10
TRANSLATION_FREQS = 4
SHIFT_CODE_DIM = 2 * ROTATION_FREQS + 2 * 2 * TRANSLATION_FREQS  # 36


def frequency_encoding(values: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """[...] -> [..., 2L]: sin(pi 2^k v) for k < L, then cos(pi 2^k v) for k < L."""
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32, device=values.device)
    angles = values.float().unsqueeze(-1) * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def encode_shift(shift: torch.Tensor) -> torch.Tensor:
    """[B, 3] (rotation in radians, tx, ty) -> [B, 36]: rotation (20 dims), tx (8), ty (8)."""
    return torch.cat([frequency_encoding(shift[:, 0], ROTATION_FREQS),
                      frequency_encoding(shift[:, 1], TRANSLATION_FREQS),
                      frequency_encoding(shift[:, 2], TRANSLATION_FREQS)], dim=-1)


class PooledViT(nn.Module):
    """A ViT encoder followed by the mean over its tokens: images -> [B, D]."""

    def __init__(self, encoder: VisionTransformer):
        super().__init__()
        self.encoder = encoder
        self.embed_dim = self.num_features = encoder.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).mean(dim=1)


class SaccadePredictor(nn.Module):
    """p = MLP(e + Linear(GELU(code(shift)))); the cycle p_back = MLP(p + Linear(GELU(code(shift_back)))).

    Both go through one ``forward`` so a DDP wrapper sees a single call per step. The hidden layers have
    their own weights (the original repeats one Linear object, so its hidden layers share weights).
    """

    def __init__(self, dim: int, depth: int = 3, init_std: float = 0.02):
        super().__init__()
        if depth < 1:
            raise ValueError(f"predictor depth must be at least 1, got {depth}")
        self.shift_embed = nn.Sequential(nn.GELU(), nn.Linear(SHIFT_CODE_DIM, dim))
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(dim, dim), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, dim))
        init_weights_as_official(self, std=init_std)

    def predict(self, embedding: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        code = self.shift_embed(encode_shift(shift).to(embedding.dtype))
        return self.mlp(embedding + code)

    def forward(self, embedding: torch.Tensor, shift: torch.Tensor,
                shift_back: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = self.predict(embedding, shift)
        return prediction, self.predict(prediction, shift_back)
