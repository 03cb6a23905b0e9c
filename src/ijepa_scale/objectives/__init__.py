"""Training objectives: what the loss is and what it needs from the models.

One file per objective, selected by ``meta.objective``: ``ijepa`` (I-JEPA), ``pkt`` (Probabilistic
I-JEPA), ``gated`` (Gated I-JEPA), ``saccade`` (Saccade JEPA). The trainer knows none of them; it relies
on this contract (``base.Objective``):

* settings: one dataclass per objective (``PKTConfig``, ``GatedConfig``, ``SaccadeConfig``), a section of
  the config tree named after the objective, validated when loaded (a bad value is one line naming the key).
* ``networks_from_config(cfg) -> {name: module}``: the trained networks (``build_networks`` with the
  run's sizes). One optimizer covers all of them (one decayed and one excluded group each); each is
  wrapped (DDP/FSDP) on its own, and each ``forward`` does a whole step's work for that network, so a
  wrapper sees one call per step.
* ``ema = {ema_name: "online.path"}`` and ``ema_networks(networks)``: frozen deep copies of the online
  modules, updated by the momentum schedule. Every objective calls its teacher ``target_encoder``; it is
  the ``encoder_name`` that eval, export and the periodic k-NN read, a plain ViT (or the saccade ConvNeXt).
* ``batches(cfg, rank)``: how the data stream's batches become inputs (``batches.Batches``: images;
  ``MaskBatches``: + the MultiBlockMaskCollator masks of the ``mask`` settings, which the stream samples,
  reported as mask-A/mask-B; ``ViewBatches``: + ``{context, target, shift, shift_back}`` of each image).
  Every draw depends only on (seed, micro-batch, rank) (``masks.seeded``). ``random_per_step``: the inputs
  also carry a seeded ``generator``, so the objective's noise (gated's gate samples) repeats after a resume.
* ``ijepa_entries`` (which network each entry of an I-JEPA-layout checkpoint starts under meta.init_from)
  and ``architecture_networks`` (the ViT encoder and predictor whose sizes a resume names on a mismatch).
* ``__call__(networks, batch) -> (loss, metrics)``: ``networks`` holds the trained and the EMA networks
  by name, ``batch`` the inputs above on the device; metrics are detached 0-dim tensors named by
  ``metric_names`` (CSV columns, in order; ``collapse.thresholds.<name>`` apply to them).
* Objectives hold no state of their own beyond their batches' sampler position: a checkpoint is the networks
  by name, ``opt`` and the trainer's progress, so every objective resumes exactly.

Networks: ijepa/pkt ``encoder``, ``predictor`` (+ ``target_encoder`` <- encoder); gated ``student``
(GatedViT), ``predictor`` (+ ``target_encoder`` <- student.encoder); saccade ``student`` (pooled ViT or
ConvNeXt), ``predictor`` (+ ``target_encoder`` <- the student's backbone). ``IJEPAObjective.losses(encoder,
predictor, target_encoder, images, masks_enc, masks_pred)`` keeps the positional I-JEPA call.
"""

from .base import Objective, resolve, settings_from_saved
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


def saved_objective(config) -> str:
    """The meta.objective a run's saved config dict records (ijepa for configs from before the choice)."""
    return ((config or {}).get("meta") or {}).get("objective", "ijepa")


def evaluated_network(config: dict):
    """(the network exported and evaluated, with random weights; the image side it takes) for a run's
    saved config dict (``Config.to_dict()``, as in every checkpoint of ours)."""
    from ..models import build_encoder
    from ..models.convnext import build_convnext
    from .saccade import view_size

    meta, size = config["meta"], config["data"]["crop_size"]
    if saved_objective(config) == "saccade":
        settings = settings_from_saved(SaccadeConfig, config.get("saccade"))
        size = view_size(size, settings)  # evaluated at the size it was trained on
        if settings.backbone != "vit":
            return build_convnext(settings.backbone, settings.embed_dim), size
    from ..models.energy_transformer import EnergyConfig

    encoder = build_encoder(meta["model_name"], img_size=size, patch_size=config["mask"]["patch_size"],
                            embed_dim=meta.get("embed_dim"), depth=meta.get("depth"), num_heads=meta.get("num_heads"),
                            energy=EnergyConfig(**(config.get("energy") or {})))
    return encoder, size


__all__ = ["GatedConfig", "GatedObjective", "IJEPAObjective", "Objective", "PKTConfig", "PKTObjective",
           "SaccadeConfig", "SaccadeObjective", "SaccadeViews", "build_objective", "evaluated_network", "resolve",
           "saved_objective", "settings_from_saved"]
