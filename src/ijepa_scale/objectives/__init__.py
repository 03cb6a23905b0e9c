"""Training objectives: what the loss is and what it needs from the models.

One file per objective: ``ijepa`` (I-JEPA), ``pkt`` (Probabilistic I-JEPA), ``gated`` (Gated I-JEPA),
``saccade`` (Saccade JEPA). The contract the trainer can rely on (``base.Objective``):

* settings: one dataclass per objective (``PKTConfig``, ``GatedConfig``, ``SaccadeConfig``), validated
  when built; a bad value raises ``UserError`` naming the key (``pkt.grouping=...``) and the fix.
* ``build_networks(encoder, **sizes) -> {name: module}``: the trained networks, built around the backbone
  the config names (``saccade`` also builds a ConvNeXt itself). One optimizer covers all of them; each is
  wrapped (DDP/FSDP) on its own, and each ``forward`` does a whole step's work for that network, so a
  wrapper sees one call per step (the saccade predictor returns prediction and cycle in one call).
* ``ema = {ema_name: "online.path"}`` and ``ema_networks(networks)``: frozen deep copies of the online
  modules (build them before wrapping); the trainer's momentum schedule updates each from its source.
* ``batch_kind``: ``multiblock`` (images + MultiBlockMaskCollator masks), ``views`` (images turned into
  ``{context, target, shift, shift_back}`` by ``saccade.SaccadeViews(images, step, rank)``, whose draws
  depend only on (seed, step, rank), so resume needs no extra state) or ``images``.
* ``__call__(networks, batch) -> (loss, metrics)``: ``networks`` holds the trained and the EMA networks
  by name, ``batch`` is a dict; metrics are detached 0-dim tensors named by ``metric_names`` (CSV order).
* ``encoder_name``: the network exported and evaluated (the EMA teacher everywhere).
* Objectives hold no state of their own (nothing to checkpoint beyond the networks).

``IJEPAObjective`` and ``PKTObjective`` keep the I-JEPA call ``(encoder, predictor, target_encoder,
images, masks_enc, masks_pred)``; in the contract's terms they are networks ``encoder`` and ``predictor``,
``ema = {"target_encoder": "encoder"}``, ``encoder_name = "target_encoder"``, ``batch_kind = "multiblock"``.
"""

from .base import Objective, resolve
from .gated import GatedConfig, GatedObjective
from .ijepa import IJEPAObjective, ijepa_objective
from .pkt import PKTConfig, PKTObjective
from .saccade import SaccadeConfig, SaccadeObjective, SaccadeViews


def build_objective(cfg) -> Objective:
    """The objective of ``meta.objective`` with its section's settings."""
    name = cfg.meta.objective
    if name == "ijepa":
        return ijepa_objective(cfg.optimization)
    if name == "pkt":
        return PKTObjective(cfg.pkt, loss=cfg.optimization.loss)
    if name == "gated":
        return GatedObjective(cfg.gated)
    if name == "saccade":
        return SaccadeObjective(cfg.saccade)
    raise ValueError(f"unknown objective {name!r}")


def evaluated_network(config: dict):
    """(the network exported and evaluated, with random weights; the image side it takes) for a run's
    saved config dict (``Config.to_dict()``, as in every checkpoint of ours)."""
    from ..models import build_encoder
    from ..models.convnext import build_convnext
    from .saccade import view_size

    meta, size = config["meta"], config["data"]["crop_size"]
    if meta.get("objective", "ijepa") == "saccade":
        settings = SaccadeConfig(**config.get("saccade", {}))
        if settings.backbone != "vit":
            return build_convnext(settings.backbone, settings.embed_dim), size
        size = view_size(size, settings)
    encoder = build_encoder(meta["model_name"], img_size=size, patch_size=config["mask"]["patch_size"],
                            embed_dim=meta.get("embed_dim"), depth=meta.get("depth"), num_heads=meta.get("num_heads"))
    return encoder, size


__all__ = ["GatedConfig", "GatedObjective", "IJEPAObjective", "Objective", "PKTConfig", "PKTObjective",
           "SaccadeConfig", "SaccadeObjective", "SaccadeViews", "build_objective", "evaluated_network", "resolve"]
