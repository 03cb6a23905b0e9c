"""Gated I-JEPA: learned per-token gates decide what the predictor sees; it reconstructs every token.

No masks are sampled. The student ViT's tokens pass through relaxed-Bernoulli gates (closed tokens are
replaced by a learned mask token), a token predictor maps the gated sequence to the EMA teacher's
layer-normed tokens at all positions, and a penalty pushes the gates closed:

    loss = mean_(b,i) ||LN(p_bi) - LN(t_bi)||^2 + lambda_gates * mean_b(exp(gate_exp_alpha * f_b) - 1),

with f_b = mean_i sigmoid(log_alpha_bi), the open fraction of image b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.gated import GATE_LOCATIONS, GatedViT, TokenPredictor
from .base import Objective
from .ijepa import METRIC_NAMES, collapse_metrics

EVAL_MODES = ("gated", "all_open")


@dataclass
class GatedConfig:
    """Settings of Gated I-JEPA; the defaults are the original's Hydra defaults (model.*)."""

    gate_beta: float = 2 / 3
    lambda_gates: float = 1.0
    gate_exp_alpha: float = 4.0
    gate_layer: int | None = None
    gate_location: str = "post"
    mask_position: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not self.gate_beta > 0:
            raise UserError(f"gated.gate_beta={self.gate_beta} must be positive (the original uses 2/3)")
        if self.lambda_gates < 0:
            raise UserError(f"gated.lambda_gates={self.lambda_gates} is negative; use a weight >= 0")
        if self.gate_location not in GATE_LOCATIONS:
            raise UserError(f"gated.gate_location={self.gate_location!r} is not one of {', '.join(GATE_LOCATIONS)}")
        if self.gate_layer is not None and self.gate_layer < 0:
            raise UserError(f"gated.gate_layer={self.gate_layer} must be null (final tokens) or a block index >= 0")


def gate_penalty(log_alpha: torch.Tensor, lambda_gates: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda * mean_b(exp(alpha * f_b) - 1), f [B]) with f_b = mean_i sigmoid(log_alpha_bi)."""
    open_fraction = torch.sigmoid(log_alpha.float()).mean(dim=1)
    return lambda_gates * torch.expm1(alpha * open_fraction).mean(), open_fraction


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over (image, token) of the squared L2 distance over D."""
    return (prediction.float() - target.float()).pow(2).sum(dim=-1).mean()


class GatedObjective(Objective):
    """Networks: ``student`` (GatedViT: encoder + gate + mask token) and ``predictor`` (TokenPredictor)
    are trained; ``target_encoder`` (the teacher) follows ``student.encoder`` by EMA and is the encoder for export/eval.
    Batches carry only images. Metrics: the collapse metrics plus pred_loss, gate_penalty (weighted)
    and open_frac (mean sigmoid(log_alpha)).
    """

    name = "gated"
    metric_names = METRIC_NAMES + ("pred_loss", "gate_penalty", "open_frac")
    ema = {"target_encoder": "student.encoder"}
    encoder_name = "target_encoder"
    random_per_step = True  # the gate noise, from batch["generator"]

    def __init__(self, config: GatedConfig | None = None):
        self.config = config if config is not None else GatedConfig()

    def build_networks(self, encoder, pred_depth: int = 6, pred_emb_dim: int | None = None,
                       pred_heads: int | None = None):
        cfg = self.config
        if cfg.gate_layer is not None and cfg.gate_layer >= len(encoder.blocks):
            raise UserError(f"gated.gate_layer={cfg.gate_layer} but the encoder has {len(encoder.blocks)} blocks; "
                            f"use 0..{len(encoder.blocks) - 1} or null")
        student = GatedViT(encoder, beta=cfg.gate_beta, gate_layer=cfg.gate_layer, gate_location=cfg.gate_location,
                           mask_position=cfg.mask_position)
        predictor = TokenPredictor(encoder.embed_dim, pred_emb_dim or encoder.embed_dim, pred_depth,
                                   pred_heads or encoder.num_heads)
        return {"student": student, "predictor": predictor}

    def networks_from_config(self, cfg) -> dict:
        return self.build_networks(self.vit_backbone(cfg), pred_depth=cfg.meta.pred_depth,
                                   pred_emb_dim=cfg.meta.pred_emb_dim)

    def __call__(self, networks: Mapping, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["images"]
        with torch.no_grad():
            tokens = networks["target_encoder"](images)
            target = F.layer_norm(tokens, (tokens.size(-1),))
        mixed, _, log_alpha = networks["student"](images, generator=batch.get("generator"))
        raw = networks["predictor"](mixed)
        prediction = F.layer_norm(raw, (raw.size(-1),))
        pred_loss = reconstruction_loss(prediction, target)
        penalty, open_fraction = gate_penalty(log_alpha, self.config.lambda_gates, self.config.gate_exp_alpha)
        metrics = collapse_metrics(raw.detach(), target, tokens.mean(dim=1))
        metrics.update(pred_loss=pred_loss.detach(), gate_penalty=penalty.detach(),
                       open_frac=open_fraction.detach().mean())
        return pred_loss + penalty, metrics

    @staticmethod
    @torch.no_grad()
    def features(networks: Mapping, images: torch.Tensor, mode: str = "gated") -> torch.Tensor:
        """Layer-normed predictor tokens [B, N, D] for evaluation: ``gated`` (hard gates; the modules
        must be in eval mode) or ``all_open`` (student tokens straight into the predictor)."""
        if mode not in EVAL_MODES:
            raise UserError(f"gated evaluation mode {mode!r} is not one of {', '.join(EVAL_MODES)}")
        tokens, _, _ = networks["student"](images, gated=mode == "gated")
        out = networks["predictor"](tokens)
        return F.layer_norm(out, (out.size(-1),))


class GatedFeatures(torch.nn.Module):
    """A gated run as one frozen feature extractor (``eval --key gated|all_open``): images -> the
    layer-normed predictor tokens [B, N, D] of ``GatedObjective.features``."""

    def __init__(self, student, predictor, mode: str = "gated"):
        super().__init__()
        if mode not in EVAL_MODES:
            raise UserError(f"gated evaluation mode {mode!r} is not one of {', '.join(EVAL_MODES)}")
        self.student, self.predictor, self.mode = student, predictor, mode
        self.img_size = student.encoder.img_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return GatedObjective.features({"student": self.student, "predictor": self.predictor}, images, self.mode)
