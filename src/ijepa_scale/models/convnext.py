"""A ConvNeXt-style convolutional backbone written here (no torchvision): images -> [B, num_classes].

Stem: 4x4 stride-4 conv + LayerNorm; stages of blocks (7x7 depthwise conv, LayerNorm, pointwise MLP with
4x expansion and GELU, layer scale, residual); between stages LayerNorm + 2x2 stride-2 conv; head:
global average pool, LayerNorm, Linear. The total stride is 4 * 2**(stages - 1), so four stages need
inputs of at least 32 pixels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CONVNEXT_SIZES: dict[str, dict] = {
    "convnext_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
    "convnext_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, in_chans: int = 3, num_classes: int = 768, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), layer_scale: float = 1e-6, init_std: float = 0.02):
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} must be non-empty and of equal length")
        self.embed_dim = self.num_features = num_classes
        self.downsample = nn.ModuleList()
        self.downsample.append(nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                                             LayerNorm2d(dims[0], eps=1e-6)))
        for i in range(1, len(dims)):
            self.downsample.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6),
                                                 nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*(ConvNeXtBlock(dim, layer_scale) for _ in range(depth)))
                                    for depth, dim in zip(depths, dims))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        self.min_input = 4 * 2 ** (len(dims) - 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=init_std)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input:
            raise ValueError(f"this ConvNeXt ({len(self.stages)} stages) needs inputs of at least "
                             f"{self.min_input} px, got {tuple(x.shape[-2:])}")
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean(dim=(-2, -1))))


def build_convnext(name: str, num_classes: int, in_chans: int = 3) -> ConvNeXt:
    if name not in CONVNEXT_SIZES:
        raise ValueError(f"unknown ConvNeXt size {name!r}; valid names: {', '.join(CONVNEXT_SIZES)}")
    return ConvNeXt(in_chans=in_chans, num_classes=num_classes, **CONVNEXT_SIZES[name])
