"""Saccade JEPA: predict the EMA teacher's embedding of one view from the student's embedding of another
view of the same image, given the small rotation and translation ("saccade") that relates them.

Views: the image is warped by A = [[cos t, -sin t, tx], [sin t, cos t, ty]] (``affine_grid`` coordinates
in [-1, 1]; rotation t ~ U(+-max_rotation_deg), tx, ty ~ U(+-f) with f = int((H - crop) * 0.9) / H), and
both the warped and the plain image are centre-cropped to ``crop_size``. The context is the warped
crop and the target the plain crop; with probability 1/2 they are swapped and the shift becomes the
inverse transform. The predictor sees the context embedding plus an embedding of the sin/cos code of
the shift; the cycle term maps the prediction back with the inverse shift.

    loss = Huber(p, e_t) + cycle_weight * MSE(p_back, e_c) + variance_weight * Var(e_c) + covariance_weight * Cov(e_c)

Differences from the original (LumenPallidium/jepa):
* the backward shift is the code of the inverse transform (-t, -R^T (tx, ty)); the original negates the
  36-dim code, which is right for the sine half only (cosine is even), so its "inverse" is not an
  encoding of any shift;
* Var/Cov are ``ijepa.variance_covariance`` (std with eps 1e-4 and off-diagonal covariance over n - 1),
  the standard VICReg terms; the original takes sqrt(var + 1e-8) and sums the upper triangle of the
  covariance *including the diagonal* over B, which penalises the variance the variance term asks for;
* the predictor MLP's hidden layers have their own weights (see models/saccade.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..masks.seeded import seeded_generator
from ..models.convnext import CONVNEXT_SIZES, build_convnext
from ..models.saccade import PooledViT, SaccadePredictor
from .base import Objective
from .batches import ViewBatches
from .ijepa import METRIC_NAMES, batch_std, effective_rank, variance_covariance

# Keeps the view draws apart from the mask sampler's streams for the same (seed, step, rank).
_VIEW_STREAM = 0x5ACCADE
BACKBONES = ("vit",) + tuple(CONVNEXT_SIZES)


@dataclass
class SaccadeConfig:
    """Settings of Saccade JEPA; loss weights and view geometry are the original's (HEAD config)."""

    backbone: str = "vit"
    embed_dim: int = 1536  # the ConvNeXt output width (the ViT backbone uses its own width)
    crop_fraction: float = 0.64  # 128 of 200 px in the original
    max_rotation_deg: float = 2.0
    translation_fraction: float = 0.9
    interpolation: str = "nearest"
    predictor_depth: int = 3
    huber_delta: float = 1.0
    cycle_weight: float = 0.25
    variance_weight: float = 25.0
    covariance_weight: float = 1.0
    vicreg_gamma: float = 4.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise UserError(f"saccade.backbone={self.backbone!r} is not one of {', '.join(BACKBONES)}")
        if not 0 < self.crop_fraction <= 1:
            raise UserError(f"saccade.crop_fraction={self.crop_fraction} must be in (0, 1] (the original: 0.64)")
        if self.interpolation not in ("nearest", "bilinear"):
            raise UserError(f"saccade.interpolation={self.interpolation!r} must be nearest or bilinear")
        for name in ("cycle_weight", "variance_weight", "covariance_weight", "max_rotation_deg", "embed_dim"):
            if getattr(self, name) < 0:
                raise UserError(f"saccade.{name}={getattr(self, name)} is negative; use a value >= 0")


def affine_matrices(shift: torch.Tensor) -> torch.Tensor:
    """[B, 3] (rotation, tx, ty) -> [B, 2, 3] for ``affine_grid``."""
    cos, sin = torch.cos(shift[:, 0]), torch.sin(shift[:, 0])
    return torch.stack([torch.stack([cos, -sin, shift[:, 1]], dim=-1),
                        torch.stack([sin, cos, shift[:, 2]], dim=-1)], dim=1)


def inverse_shift(shift: torch.Tensor) -> torch.Tensor:
    """The (rotation, tx, ty) of the inverse transform: [R | t]^-1 = [R^T | -R^T t]."""
    cos, sin = torch.cos(shift[:, 0]), torch.sin(shift[:, 0])
    tx, ty = shift[:, 1], shift[:, 2]
    return torch.stack([-shift[:, 0], -(cos * tx + sin * ty), -(-sin * tx + cos * ty)], dim=-1)


def warp(images: torch.Tensor, shift: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    grid = F.affine_grid(affine_matrices(shift).to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    top = (images.shape[-2] - size) // 2
    left = (images.shape[-1] - size) // 2
    return images[..., top:top + size, left:left + size]


def view_size(image_size: int, config: SaccadeConfig) -> int:
    """Side of the two views cut from ``image_size`` px images."""
    return max(1, int(round(image_size * config.crop_fraction)))


class SaccadeViews:
    """Makes the two views of each image; the random draws depend only on (seed, step, rank), so a
    resumed run makes the same views."""

    def __init__(self, image_size: int, config: SaccadeConfig | None = None, seed: int = 0):
        self.config = config if config is not None else SaccadeConfig()
        self.image_size = image_size
        self.crop_size = view_size(image_size, self.config)
        max_translation = int((image_size - self.crop_size) * self.config.translation_fraction)
        self.max_translate = max_translation / image_size
        self.max_rotation = math.radians(self.config.max_rotation_deg)
        self.seed = seed

    def sample(self, batch_size: int, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift [B, 3] of the warped view, swap [B] bool)."""
        generator = seeded_generator(_VIEW_STREAM, self.seed, step, rank)
        u = torch.rand(batch_size, 4, generator=generator)
        shift = torch.stack([(2 * u[:, 0] - 1) * self.max_rotation,
                             (2 * u[:, 1] - 1) * self.max_translate,
                             (2 * u[:, 2] - 1) * self.max_translate], dim=-1)
        return shift, u[:, 3] < 0.5

    def __call__(self, images: torch.Tensor, step: int, rank: int = 0) -> dict[str, torch.Tensor]:
        """{context, target: [B, C, crop, crop], shift, shift_back: [B, 3]} (shift: context -> target)."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"SaccadeViews was built for {self.image_size} px images, got {tuple(images.shape[-2:])}")
        shift, swap = self.sample(len(images), step, rank)
        warped = center_crop(warp(images, shift.to(images.device), self.config.interpolation), self.crop_size)
        plain = center_crop(images, self.crop_size)
        back = inverse_shift(shift)
        swap_img = swap.to(images.device).view(-1, 1, 1, 1)
        return {
            "context": torch.where(swap_img, plain, warped),
            "target": torch.where(swap_img, warped, plain),
            "shift": torch.where(swap.unsqueeze(-1), back, shift).to(images.device),
            "shift_back": torch.where(swap.unsqueeze(-1), shift, back).to(images.device),
        }


class SaccadeObjective(Objective):
    """Networks: ``student`` (PooledViT or ConvNeXt, images -> [B, C]) and ``predictor``
    (SaccadePredictor) are trained; ``target_encoder`` (the teacher) follows the student's backbone by EMA
    (the bare ViT, or the ConvNeXt) and is the encoder for export/eval. Batches carry two views and their
    shifts (SaccadeViews). Metrics: pred_norm, target_std
    (of the layer-normed teacher embeddings), eff_rank (teacher embeddings), and the unweighted terms
    pred_loss (Huber), cycle_loss, var_loss, cov_loss.
    """

    name = "saccade"
    metric_names = METRIC_NAMES + ("pred_loss", "cycle_loss", "var_loss", "cov_loss")
    encoder_name = "target_encoder"

    def __init__(self, config: SaccadeConfig | None = None):
        self.config = config if config is not None else SaccadeConfig()
        # With the ViT backbone the teacher is the bare ViT (what eval and export read); its tokens are
        # mean-pooled here, as PooledViT does for the student.
        self.ema = {"target_encoder": "student.encoder" if self.config.backbone == "vit" else "student"}

    def input_size(self, crop_size: int) -> int:
        return view_size(crop_size, self.config)

    def networks_from_config(self, cfg) -> dict:
        networks = self.build_networks(self.vit_backbone(cfg) if self.config.backbone == "vit" else None)
        size, needed = self.input_size(cfg.data.crop_size), getattr(networks["student"], "min_input", 1)
        if size < needed:
            raise UserError(f"saccade.backbone={self.config.backbone} needs views of at least {needed} px, but "
                            f"data.crop_size={cfg.data.crop_size} x saccade.crop_fraction={self.config.crop_fraction} "
                            f"gives {size} px; raise data.crop_size "
                            f"(>= {math.ceil(needed / self.config.crop_fraction)})")
        return networks

    def batches(self, cfg, rank: int) -> ViewBatches:
        views = SaccadeViews(cfg.data.crop_size, self.config, seed=cfg.meta.seed)
        return ViewBatches(views, cfg.meta.seed, rank, self.random_per_step)

    @staticmethod
    def teacher(networks: Mapping, images: torch.Tensor) -> torch.Tensor:
        out = networks["target_encoder"](images)
        return out.mean(dim=1) if out.ndim == 3 else out

    def build_networks(self, encoder=None, in_chans: int = 3):
        """``encoder``: the ViT for backbone ``vit`` (mean-pooled); ConvNeXt backbones are built here."""
        cfg = self.config
        if cfg.backbone == "vit":
            if encoder is None:
                raise UserError("saccade.backbone=vit needs the ViT encoder of meta.model_name")
            student = PooledViT(encoder)
        else:
            student = build_convnext(cfg.backbone, cfg.embed_dim, in_chans=in_chans)
        return {"student": student, "predictor": SaccadePredictor(student.embed_dim, cfg.predictor_depth)}

    def __call__(self, networks: Mapping, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        with torch.no_grad():
            target = self.teacher(networks, batch["target"])
        context = networks["student"](batch["context"])
        prediction, back = networks["predictor"](context, batch["shift"], batch["shift_back"])
        with torch.autocast(context.device.type, enabled=False):
            pred_loss = F.huber_loss(prediction.float(), target.float(), delta=cfg.huber_delta)
            cycle_loss = F.mse_loss(back.float(), context.float())
            var_loss, cov_loss = variance_covariance(context, cfg.vicreg_gamma)
            loss = (pred_loss + cfg.cycle_weight * cycle_loss + cfg.variance_weight * var_loss
                    + cfg.covariance_weight * cov_loss)
            metrics = {
                "pred_norm": prediction.detach().float().norm(dim=-1).mean(),
                "target_std": batch_std(F.layer_norm(target.float(), (target.size(-1),))),
                "eff_rank": effective_rank(target),
                "pred_loss": pred_loss.detach(), "cycle_loss": cycle_loss.detach(),
                "var_loss": var_loss.detach(), "cov_loss": cov_loss.detach(),
            }
        return loss, metrics
