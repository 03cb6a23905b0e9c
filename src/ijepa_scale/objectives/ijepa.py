"""The I-JEPA objective: predict layer-normed target-encoder features of masked blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.utils import apply_masks, repeat_interleave_batch

# What every call returns beside the loss (global means are logged per step; see collapse_metrics).
METRIC_NAMES = ("pred_norm", "target_std", "eff_rank")


@torch.no_grad()
def effective_rank(features: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the normalised singular values of the centred [N, D] batch (0 if it has no spread)."""
    x = features.float()
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    total = s.sum()
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -(p * p.clamp_min(torch.finfo(s.dtype).tiny).log()).sum()
    return torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))


@torch.no_grad()
def collapse_metrics(predictions: torch.Tensor, target_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Signals of representation collapse, cheap enough for every step.

    pred_norm: mean L2 norm of the predicted target tokens (tiny-IJEPA's `mag`; falls to 0 on collapse);
    target_std: std across the batch of the layer-normed target tokens, averaged over positions and
    dimensions (0 when every image gets the same features); eff_rank: effective rank of the
    mean-pooled target-encoder outputs (the features a probe sees), at most min(batch - 1, width).
    Values are 0-dim tensors on the batch's device, so computing them does not wait for the device.
    """
    with torch.autocast(predictions.device.type, enabled=False):
        normed = F.layer_norm(target_tokens.float(), (target_tokens.size(-1),))
        return {
            "pred_norm": predictions.float().norm(dim=-1).mean(),
            "target_std": normed.std(dim=0).mean(),
            "eff_rank": effective_rank(target_tokens.float().mean(dim=1)),
        }


class IJEPAObjective:
    metric_names = METRIC_NAMES

    def __init__(self, loss: str = "smooth_l1"):
        if loss not in ("smooth_l1", "l2"):
            raise ValueError(f"optimization.loss={loss!r} must be smooth_l1 or l2")
        self.loss = loss

    def _mask_targets(self, tokens: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        h = F.layer_norm(tokens, (tokens.size(-1),))
        h = apply_masks(h, masks_pred)
        return repeat_interleave_batch(h, len(tokens), repeat=len(masks_enc))

    def targets(self, target_encoder, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        with torch.no_grad():
            return self._mask_targets(target_encoder(images), masks_enc, masks_pred)

    def predictions(self, encoder, predictor, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        z = encoder(images, masks_enc)
        return predictor(z, masks_enc, masks_pred)

    def __call__(self, encoder, predictor, target_encoder, images, masks_enc,
                 masks_pred) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics): the loss to minimise and the collapse metrics of this batch."""
        with torch.no_grad():
            tokens = target_encoder(images)
            h = self._mask_targets(tokens, masks_enc, masks_pred)
        z = self.predictions(encoder, predictor, images, masks_enc, masks_pred)
        if self.loss == "smooth_l1":
            loss = F.smooth_l1_loss(z, h)
        else:
            loss = F.mse_loss(z, h)
        return loss, collapse_metrics(z.detach(), tokens)


def build_objective(opt_cfg) -> IJEPAObjective:
    return IJEPAObjective(loss=opt_cfg.loss)
