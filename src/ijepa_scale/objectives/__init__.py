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

from .gated import GatedConfig, GatedObjective
from .ijepa import IJEPAObjective, build_objective
from .pkt import PKTConfig, PKTObjective
from .saccade import SaccadeConfig, SaccadeObjective, SaccadeViews

__all__ = ["GatedConfig", "GatedObjective", "IJEPAObjective", "PKTConfig", "PKTObjective", "SaccadeConfig",
           "SaccadeObjective", "SaccadeViews", "build_objective"]
