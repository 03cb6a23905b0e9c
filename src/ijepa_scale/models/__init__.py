"""I-JEPA models: ViT encoder, predictor and mask helpers (plain single-device PyTorch)."""

from .factory import build_encoder, build_predictor
from .utils import apply_masks, repeat_interleave_batch
from .vision_transformer import (
    LAYER_NORM_EPS,
    VIT_EMBED_DIMS,
    VIT_SIZES,
    Attention,
    Block,
    MLP,
    PatchEmbed,
    VisionTransformer,
    VisionTransformerPredictor,
    get_2d_sincos_pos_embed,
    init_weights_as_official,
    vit_base,
    vit_giant,
    vit_huge,
    vit_large,
    vit_predictor,
    vit_small,
    vit_tiny,
)

__all__ = [
    "LAYER_NORM_EPS",
    "VIT_EMBED_DIMS",
    "VIT_SIZES",
    "Attention",
    "Block",
    "MLP",
    "PatchEmbed",
    "VisionTransformer",
    "VisionTransformerPredictor",
    "apply_masks",
    "build_encoder",
    "build_predictor",
    "get_2d_sincos_pos_embed",
    "init_weights_as_official",
    "repeat_interleave_batch",
    "vit_base",
    "vit_giant",
    "vit_huge",
    "vit_large",
    "vit_predictor",
    "vit_small",
    "vit_tiny",
]
