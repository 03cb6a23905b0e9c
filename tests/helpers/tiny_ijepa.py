"""A tiny I-JEPA setup for objective unit tests: seeded encoder, predictor, target copy, images, masks."""

import copy

import torch

from ijepa_scale.masks import MultiBlockMaskCollator
from ijepa_scale.models import build_encoder, build_predictor


def tiny_ijepa_batch(batch_size: int = 8):
    """(encoder, predictor, target_encoder, images, masks_enc, masks_pred) at 32 px / patch 8, width 32."""
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    pred = build_predictor(enc, pred_depth=1, pred_emb_dim=16)
    tgt = copy.deepcopy(enc)
    coll = MultiBlockMaskCollator(input_size=32, patch_size=8, enc_mask_scale=(0.85, 1.0),
                                  pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                                  min_keep=4, allow_overlap=False, seed=0)
    images = torch.randn(batch_size, 3, 32, 32)
    masks_enc, masks_pred = coll.sample(len(images), 0)
    return enc, pred, tgt, images, masks_enc, masks_pred
