"""Encoders and predictors by name: the one place that chooses between the architectures."""

from __future__ import annotations

from typing import Sequence

from .energy_transformer import EnergyTransformer, build_energy_encoder, build_energy_predictor
from .vision_transformer import VIT_SIZES, VisionTransformer, VisionTransformerPredictor, vit_predictor


def build_encoder(
    model_name: str,
    img_size: int | Sequence[int],
    patch_size: int,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    energy=None,
) -> VisionTransformer:
    """Build a named encoder, optionally overriding its width, depth or head count.

    ``model_name="energy_transformer"`` builds :class:`~ijepa_scale.models.energy_transformer.EnergyTransformer` with the
    settings of ``energy`` (an ``EnergyConfig``; ignored by ViTs) and no depth.
    """
    if model_name == "energy_transformer":
        if depth is not None:
            raise ValueError("energy_transformer has no depth: its iterations are energy.steps")
        return build_energy_encoder(img_size, patch_size, embed_dim, num_heads, energy)
    if model_name not in VIT_SIZES:
        raise ValueError(
            f"unknown model_name {model_name!r}; valid names: {', '.join(VIT_SIZES)}, energy_transformer"
        )
    cfg = dict(VIT_SIZES[model_name])
    for field, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if value is not None:
            if value <= 0:
                raise ValueError(f"{field} must be positive, got {value}")
            cfg[field] = value
    if cfg["embed_dim"] % cfg["num_heads"] != 0:
        raise ValueError(
            f"embed_dim {cfg['embed_dim']} is not divisible by num_heads {cfg['num_heads']}"
        )
    return VisionTransformer(img_size=img_size, patch_size=patch_size, **cfg)


def build_predictor(
    encoder: VisionTransformer, pred_depth: int, pred_emb_dim: int, energy=None
) -> VisionTransformerPredictor:
    """Build the predictor for ``encoder``; like upstream it uses the encoder's head count.

    An energy-transformer encoder gets an :class:`~ijepa_scale.models.energy_transformer.EnergyPredictor` set by
    ``energy`` (``pred_depth`` is then unused).
    """
    if isinstance(encoder, EnergyTransformer):
        return build_energy_predictor(encoder, pred_emb_dim, energy)
    heads = encoder.num_heads
    if pred_emb_dim % heads != 0:
        raise ValueError(
            f"pred_emb_dim {pred_emb_dim} is not divisible by the encoder's num_heads {heads}"
        )
    return vit_predictor(
        num_patches=encoder.num_patches,
        embed_dim=encoder.embed_dim,
        predictor_embed_dim=pred_emb_dim,
        depth=pred_depth,
        num_heads=heads,
    )
