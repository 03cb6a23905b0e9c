"""Probabilistic I-JEPA: the I-JEPA regression plus a PKT (probabilistic knowledge transfer) term.

The PKT term compares, within a group of predicted tokens, each token's distribution of similarities
to the others with the same distribution among the target tokens (KL(target || prediction)).

Two groupings:

* ``image`` (what the original meant, and what its README's ``L2_PKT`` names): one group per image,
  made of all its predicted target tokens (every target block, every context mask). The predictor's rows
  are mask-major (row ``m * B + b``), so the group of image ``b`` gathers rows ``b, B + b, 2B + b, ...``.
  loss = l2_weight * L2 + pkt_weight * mean over images of PKT.
* ``chunks`` (``L2_PKT_chunks``, what every shipped config of the original ran): the predictions and
  targets are flattened to [R, D] in the predictor's row order and cut into consecutive chunks of
  ``chunk_rows`` rows (the last one may be shorter), so a chunk mixes several images.
  loss = (pkt_weight * sum over chunks of PKT + l2_weight * L2) / divisor, where the divisor is R / chunk_rows
  when ``divide_by_chunks`` (the original: it divides the L2 term too, so at ImageNet scale the L2 term
  weighs about 1/200 of the PKT term) and 1 otherwise.

The ``L2`` in the original's names is nominal: the regression term is smooth-L1 (beta 1), as in I-JEPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .ijepa import IJEPAObjective, collapse_metrics

GROUPINGS = ("image", "chunks")

# The original's loss names (optimization.loss_function there) -> our settings.
LOSS_ALIASES = {
    "L2_PKT": dict(grouping="image", l2_weight=1.0, pkt_weight=1.0, divide_by_chunks=False),
    "L2_PKT_chunks": dict(grouping="chunks", l2_weight=1.0, pkt_weight=1.0, divide_by_chunks=True),
}


@dataclass
class PKTConfig:
    """Settings of the PKT objective; the defaults are the original's intended ``L2_PKT``."""

    grouping: str = "image"
    l2_weight: float = 1.0
    pkt_weight: float = 1.0
    chunk_rows: int = 256
    divide_by_chunks: bool = False
    eps: float = 1e-7

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.grouping not in GROUPINGS:
            raise UserError(f"pkt.grouping={self.grouping!r} is not one of {', '.join(GROUPINGS)}; "
                            f"set pkt.grouping: image (per image) or chunks (the original's L2_PKT_chunks)")
        for name in ("l2_weight", "pkt_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"pkt.{name}={getattr(self, name)} is negative; use a weight >= 0")
        if self.chunk_rows < 2:
            raise UserError(f"pkt.chunk_rows={self.chunk_rows} must be at least 2 (the original used 256)")
        if not self.eps > 0:
            raise UserError(f"pkt.eps={self.eps} must be positive (the original used 1e-7)")

    @classmethod
    def from_loss_name(cls, name: str, **overrides) -> "PKTConfig":
        """The settings for one of the original's loss names (``L2_PKT``, ``L2_PKT_chunks``)."""
        if name not in LOSS_ALIASES:
            raise UserError(f"PKT loss name {name!r} is not one of {', '.join(LOSS_ALIASES)}")
        return cls(**{**LOSS_ALIASES[name], **overrides})


def pkt_kernel(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Row-normalised cosine kernel of [..., n, D] rows: [..., n, n] conditional distributions.

    Cosine similarities (diagonal included) mapped from [-1, 1] to [0, 1], each row divided by its sum.
    """
    x = x / (x.norm(dim=-1, keepdim=True) + eps)
    x = torch.nan_to_num(x, nan=0.0)
    similarity = (x @ x.transpose(-1, -2) + 1.0) / 2.0
    return similarity / similarity.sum(dim=-1, keepdim=True)


def pkt_divergence(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT of [..., n, D] predictions against targets: [...].

    The mean over all n*n entries of P * log((P + eps) / (Q + eps)), P from the targets and Q from the
    predictions, i.e. (1/n) * the mean over rows of KL(P_i || Q_i), as the original computes it.
    """
    with torch.autocast(prediction.device.type, enabled=False):
        q = pkt_kernel(prediction.float(), eps)
        p = pkt_kernel(target.float(), eps)
        return (p * torch.log((p + eps) / (q + eps))).mean(dim=(-2, -1))


def group_by_image(rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mask-major predictor rows [G * B, K, D] -> one group per image, [B, G * K, D]."""
    groups = rows.shape[0] // batch_size
    if groups * batch_size != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} predictor rows are not a multiple of the batch size {batch_size}")
    grouped = rows.reshape(groups, batch_size, *rows.shape[1:]).transpose(0, 1)
    return grouped.reshape(batch_size, groups * rows.shape[1], rows.shape[2])


def pkt_per_image(prediction: torch.Tensor, target: torch.Tensor, batch_size: int,
                  eps: float = 1e-7) -> torch.Tensor:
    """Mean over images of the PKT of each image's predicted tokens."""
    return pkt_divergence(group_by_image(prediction, batch_size), group_by_image(target, batch_size), eps).mean()


def pkt_chunk_sum(prediction: torch.Tensor, target: torch.Tensor, chunk_rows: int = 256,
                  eps: float = 1e-7) -> tuple[torch.Tensor, float]:
    """(sum of PKT over consecutive chunks of flattened rows, R / chunk_rows), the original's chunking."""
    z = prediction.reshape(-1, prediction.shape[-1])
    h = target.reshape(-1, target.shape[-1])
    rows = z.shape[0]
    full = rows // chunk_rows * chunk_rows
    total = z.new_zeros((), dtype=torch.float32)
    if full:
        # All full chunks in one batched kernel, then the shorter remainder.
        total = total + pkt_divergence(z[:full].reshape(-1, chunk_rows, z.shape[-1]),
                                       h[:full].reshape(-1, chunk_rows, h.shape[-1]), eps).sum()
    if full < rows:
        total = total + pkt_divergence(z[full:], h[full:], eps)
    return total, rows / chunk_rows


class PKTObjective(IJEPAObjective):
    """I-JEPA networks and batches (multi-block masks); the loss adds the PKT term.

    Logs the I-JEPA collapse metrics plus ``pred_loss`` (the regression term) and ``pkt_loss`` (the mean
    PKT per group: per image, or per chunk), both before weighting.
    """

    name = "pkt"

    def __init__(self, config: PKTConfig | None = None, loss: str = "smooth_l1"):
        super().__init__(loss=loss)
        self.config = config if config is not None else PKTConfig()
        self.metric_names = self.metric_names + ("pred_loss", "pkt_loss")

    def loss_terms(self, z: torch.Tensor, h: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, dict]:
        """(loss, {pred_loss, pkt_loss}) of predictions ``z`` against targets ``h`` [rows, K, D]."""
        cfg = self.config
        regression = F.smooth_l1_loss(z, h) if self.loss == "smooth_l1" else F.mse_loss(z, h)
        if cfg.grouping == "image":
            pkt = pkt_per_image(z, h, batch_size, cfg.eps)
            loss = cfg.l2_weight * regression + cfg.pkt_weight * pkt
        else:
            pkt_sum, num_chunks = pkt_chunk_sum(z, h, cfg.chunk_rows, cfg.eps)
            divisor = num_chunks if cfg.divide_by_chunks else 1.0
            loss = (cfg.pkt_weight * pkt_sum + cfg.l2_weight * regression) / divisor
            pkt = pkt_sum / max(1, -(-z.shape[0] * z.shape[1] // cfg.chunk_rows))
        return loss, {"pred_loss": regression.detach(), "pkt_loss": pkt.detach()}

    def losses(self, encoder, predictor, target_encoder, images, masks_enc,
               masks_pred) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, normed, h, _, z = self.forward(encoder, predictor, target_encoder, images, masks_enc, masks_pred)
        loss, terms = self.loss_terms(z, h, len(images))
        metrics = collapse_metrics(z.detach(), normed, tokens.mean(dim=1))
        metrics.update(terms)
        return loss, metrics
