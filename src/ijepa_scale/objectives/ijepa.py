"""The I-JEPA objective: predict layer-normed target-encoder features of masked blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.utils import apply_masks, repeat_interleave_batch
from ..masks import MultiBlockMaskCollator
from .base import Objective
from .batches import MaskBatches

# What every call returns beside the loss (global means are logged per step; see collapse_metrics).
METRIC_NAMES = ("pred_norm", "target_std", "eff_rank")


@torch.no_grad()
def effective_rank(features: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the normalised singular values of the centred [N, D] batch (0 if it has no spread)."""
    x = features.float()
    finite = torch.isfinite(x).all()
    # A diverged step (inf/nan features) must log NaN, not stop the run inside the eigensolver.
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    x = x - x.mean(dim=0, keepdim=True)
    # Singular values from the eigenvalues of the smaller Gram matrix: several times cheaper than an SVD.
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    try:
        s = torch.linalg.eigvalsh(torch.nan_to_num(gram, nan=0.0, posinf=0.0, neginf=0.0)).clamp_min(0).sqrt()
    except torch.linalg.LinAlgError:
        return torch.full((), float("nan"), device=x.device)
    total = s.sum()
    tiny = torch.finfo(s.dtype).tiny
    p = s / total.clamp_min(tiny)
    entropy = -(p * p.clamp_min(tiny).log()).sum()
    rank = torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))
    return torch.where(finite, rank, torch.full_like(rank, float("nan")))


@torch.no_grad()
def batch_std(x: torch.Tensor) -> torch.Tensor:
    """Std across dim 0, averaged over all other positions; sums by matrix products (a strided
    reduction over the batch dimension is an order of magnitude slower on CPU)."""
    flat = x.float().reshape(len(x), -1)
    ones = torch.ones(1, len(x), dtype=flat.dtype, device=flat.device)
    total, squares = ones @ flat, ones @ (flat * flat)
    var = (squares - total * total / len(x)) / max(1, len(x) - 1)
    return var.clamp_min(0).sqrt().mean()


@torch.no_grad()
def collapse_metrics(predictions: torch.Tensor, normed_tokens: torch.Tensor,
                     pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Signals of representation collapse, cheap enough for every step.

    pred_norm: mean L2 norm of the predicted target tokens (tiny-IJEPA's `mag`; falls to 0 on collapse);
    target_std: std across the batch of the layer-normed target tokens [B, N, D], averaged over positions
    and dimensions (0 when every image gets the same features); eff_rank: effective rank of the
    mean-pooled target-encoder outputs [B, D] (the features a probe sees), at most min(B - 1, D).
    Values are 0-dim tensors on the batch's device, so computing them does not wait for the device.
    """
    with torch.autocast(predictions.device.type, enabled=False):
        return {
            "pred_norm": predictions.float().norm(dim=-1).mean(),
            "target_std": batch_std(normed_tokens),
            "eff_rank": effective_rank(pooled),
        }


def variance_covariance(features: torch.Tensor, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms of a [N, D] batch of features.

    variance: mean over dimensions of relu(gamma - std across the batch); covariance: sum of the squared
    off-diagonal entries of the batch covariance matrix, divided by D.
    """
    x = features.float()
    x = x - x.mean(dim=0, keepdim=True)
    n, d = x.shape
    std = torch.sqrt(x.var(dim=0) + 1e-4)
    variance = F.relu(gamma - std).mean()
    cov = (x.T @ x) / max(1, n - 1)
    off_diagonal = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
    return variance, off_diagonal / d


class IJEPAObjective(Objective):
    """I-JEPA's loss, optionally with variance/covariance terms on the context encoder's pooled output.

    Networks: ``encoder`` (context) and ``predictor`` are trained; ``target_encoder`` follows ``encoder``
    by EMA and is the encoder exported and evaluated. Batches carry multi-block masks.

    The terms act on the mean over visible tokens of the context encoder's output, layer-normed without
    affine parameters so the final norm's gain cannot fake spread. They are off by default (the official
    objective); at small scale and short budgets they keep the encoder from discarding content while the
    predictor learns (measured in the README's "Does it learn?").
    """

    def __init__(self, loss: str = "smooth_l1", variance_weight: float = 0.0, covariance_weight: float = 0.0,
                 variance_target: float = 1.0):
        if loss not in ("smooth_l1", "l2"):
            raise ValueError(f"optimization.loss={loss!r} must be smooth_l1 or l2")
        self.loss = loss
        self.variance_weight = variance_weight
        self.covariance_weight = covariance_weight
        self.variance_target = variance_target
        self.regularised = variance_weight > 0 or covariance_weight > 0
        self.metric_names = METRIC_NAMES + (("pred_loss", "var_loss", "cov_loss") if self.regularised else ())

    name = "ijepa"
    ema = {"target_encoder": "encoder"}
    encoder_name = "target_encoder"
    architecture_networks = ("encoder", "predictor")

    @property
    def ijepa_entries(self) -> dict[str, str]:
        return {**super().ijepa_entries, "predictor": "predictor"}

    def batches(self, cfg, rank: int) -> MaskBatches:
        """Multi-block masks of the ``mask`` settings, drawn by the data stream for every batch."""
        m = cfg.mask
        collator = MultiBlockMaskCollator(
            input_size=cfg.data.crop_size, patch_size=m.patch_size, enc_mask_scale=m.enc_mask_scale,
            pred_mask_scale=m.pred_mask_scale, aspect_ratio=m.aspect_ratio, nenc=m.num_enc_masks,
            npred=m.num_pred_masks, min_keep=m.min_keep, allow_overlap=m.allow_overlap,
            legacy_sampler=m.legacy_sampler, seed=cfg.meta.seed, rank=rank)
        return MaskBatches(collator, cfg.meta.seed, rank, self.random_per_step)

    def build_networks(self, encoder, pred_depth: int = 6, pred_emb_dim: int = 384, energy=None) -> dict:
        """``energy``: the EnergyConfig when ``encoder`` is an energy transformer (its predictor is one too)."""
        from ..models import build_predictor

        try:
            predictor = build_predictor(encoder, pred_depth=pred_depth, pred_emb_dim=pred_emb_dim, energy=energy)
        except ValueError as exc:
            raise UserError(f"meta.pred_emb_dim={pred_emb_dim}: {exc}") from None
        return {"encoder": encoder, "predictor": predictor}

    def networks_from_config(self, cfg) -> dict:
        return self.build_networks(self.vit_backbone(cfg), cfg.meta.pred_depth, cfg.meta.pred_emb_dim, cfg.energy)

    def _mask_targets(self, normed: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        h = apply_masks(normed, masks_pred)
        return repeat_interleave_batch(h, len(normed), repeat=len(masks_enc))

    def targets(self, target_encoder, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        with torch.no_grad():
            h = target_encoder(images)
            return self._mask_targets(F.layer_norm(h, (h.size(-1),)), masks_enc, masks_pred)

    def predictions(self, encoder, predictor, images: torch.Tensor, masks_enc, masks_pred) -> torch.Tensor:
        z = encoder(images, masks_enc)
        return predictor(z, masks_enc, masks_pred)

    def forward(self, encoder, predictor, target_encoder, images, masks_enc, masks_pred):
        """The networks' part of a step: (target tokens [B, N, D], their layer-normed copy, the masked
        targets h, the context encoder's output, the predictions z)."""
        with torch.no_grad():
            tokens = target_encoder(images)
            normed = F.layer_norm(tokens, (tokens.size(-1),))
            h = self._mask_targets(normed, masks_enc, masks_pred)
        context = encoder(images, masks_enc)
        return tokens, normed, h, context, predictor(context, masks_enc, masks_pred)

    def __call__(self, networks, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.losses(networks["encoder"], networks["predictor"], networks["target_encoder"], batch["images"],
                           batch["masks_enc"], batch["masks_pred"])

    def losses(self, encoder, predictor, target_encoder, images, masks_enc,
               masks_pred) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics): the loss to minimise and the collapse metrics of this batch."""
        tokens, normed, h, context, z = self.forward(encoder, predictor, target_encoder, images, masks_enc,
                                                     masks_pred)
        if self.loss == "smooth_l1":
            loss = F.smooth_l1_loss(z, h)
        else:
            loss = F.mse_loss(z, h)
        metrics = collapse_metrics(z.detach(), normed, tokens.mean(dim=1))
        if self.regularised:
            with torch.autocast(images.device.type, enabled=False):
                pooled = F.layer_norm(context.float(), (context.size(-1),)).mean(dim=1)
                var_loss, cov_loss = variance_covariance(pooled, self.variance_target)
            metrics.update(pred_loss=loss.detach(), var_loss=var_loss.detach(), cov_loss=cov_loss.detach())
            loss = loss + self.variance_weight * var_loss + self.covariance_weight * cov_loss
        return loss, metrics


def ijepa_objective(opt_cfg) -> IJEPAObjective:
    return IJEPAObjective(loss=opt_cfg.loss, variance_weight=opt_cfg.variance_weight,
                          covariance_weight=opt_cfg.covariance_weight, variance_target=opt_cfg.variance_target)
