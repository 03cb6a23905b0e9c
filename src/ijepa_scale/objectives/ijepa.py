"""The I-JEPA objective: predict layer-normed target-encoder features of masked blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.utils import apply_masks, repeat_interleave_batch


class IJEPAObjective:
    def __init__(self, loss: str = "smooth_l1"):
        if loss not in ("smooth_l1", "l2"):
            raise ValueError(f"optimization.loss={loss!r} must be smooth_l1 or l2")
        self.loss = loss

    def targets(self, target_encoder, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        with torch.no_grad():
            h = target_encoder(images)
            h = F.layer_norm(h, (h.size(-1),))
            batch_size = len(h)
            h = apply_masks(h, masks_pred)
            return repeat_interleave_batch(h, batch_size, repeat=len(masks_enc))

    def predictions(self, encoder, predictor, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        z = encoder(images, masks_enc)
        return predictor(z, masks_enc, masks_pred)

    def __call__(self, encoder, predictor, target_encoder, images, masks_enc, masks_pred) -> torch.Tensor:
        h = self.targets(target_encoder, images, masks_enc, masks_pred)
        z = self.predictions(encoder, predictor, images, masks_enc, masks_pred)
        if self.loss == "smooth_l1":
            return F.smooth_l1_loss(z, h)
        return F.mse_loss(z, h)


def build_objective(opt_cfg) -> IJEPAObjective:
    return IJEPAObjective(loss=opt_cfg.loss)
