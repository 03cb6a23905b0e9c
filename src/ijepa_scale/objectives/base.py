"""What an objective tells the trainer (see the package docstring for the whole contract)."""

from __future__ import annotations

import abc
import copy
import dataclasses
from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..errors import UserError
from .batches import Batches

# The networks of an I-JEPA-layout checkpoint (official, ours, a bare encoder as "encoder"): what
# starts another objective's networks under meta.init_from.
IJEPA_ENTRIES = ("encoder", "target_encoder", "predictor")


def settings_from_saved(settings_class, section: Optional[dict]):
    """An objective's settings dataclass from a saved config section; keys this version does not know
    are ignored, so a checkpoint of another version stays readable."""
    known = {f.name for f in dataclasses.fields(settings_class)}
    return settings_class(**{k: v for k, v in (section or {}).items() if k in known})


def resolve(networks: Mapping[str, nn.Module], path: str) -> nn.Module:
    """``networks['student'].encoder`` for path ``student.encoder`` (unwrapping DDP/compile's ``module``)."""
    head, *rest = path.split(".")
    module = networks[head]
    for name in rest:
        if not hasattr(module, name) and hasattr(module, "module"):
            module = module.module
        module = getattr(module, name)
    return module


class Objective(abc.ABC):
    """Base of the non-I-JEPA objectives.

    Subclasses set ``name``, ``metric_names``, ``ema`` (EMA network name -> dotted path of the online
    module it follows), ``encoder_name`` (the network exported and evaluated), override ``batches`` for
    inputs beyond images, and implement ``build_networks`` and ``__call__``.
    """

    name = ""
    metric_names: tuple[str, ...] = ()
    ema: dict[str, str] = {}
    encoder_name = ""
    random_per_step = False
    """True: each batch carries a ``generator`` seeded by (seed, micro-batch, rank) only."""
    architecture_networks: Optional[tuple[str, str]] = None
    """(ViT encoder, ViT predictor) network names whose sizes a resume compares with the checkpoint's
    to name each differing setting; None: a wrong size fails on the first tensor that does not fit."""

    def batches(self, cfg, rank: int) -> Batches:
        """How this objective's inputs are made from the data stream's batches on `rank`."""
        return Batches(cfg.meta.seed, rank, self.random_per_step)

    @property
    def ijepa_entries(self) -> dict[str, str]:
        """Which network (dotted path) each entry of an I-JEPA-layout checkpoint (IJEPA_ENTRIES) starts
        under meta.init_from: the encoder starts the backbone the teacher follows."""
        return {"encoder": self.ema[self.encoder_name], "target_encoder": self.encoder_name}

    @abc.abstractmethod
    def build_networks(self, encoder: nn.Module, **kwargs) -> dict[str, nn.Module]:
        """The trained networks by name, built around the backbone ``encoder``."""

    def input_size(self, crop_size: int) -> int:
        """Side in pixels of what the networks see, for data.crop_size images."""
        return crop_size

    def vit_backbone(self, cfg) -> nn.Module:
        """The ViT of ``meta.model_name`` for this objective's input size."""
        from ..models import build_encoder

        size = self.input_size(cfg.data.crop_size)
        if size % cfg.mask.patch_size:
            raise UserError(f"the {self.name} networks see {size} px images, not a multiple of mask.patch_size="
                            f"{cfg.mask.patch_size}; change data.crop_size or mask.patch_size")
        try:
            return build_encoder(cfg.meta.model_name, img_size=size, patch_size=cfg.mask.patch_size,
                                 embed_dim=cfg.meta.embed_dim, depth=cfg.meta.depth, num_heads=cfg.meta.num_heads,
                                 energy=cfg.energy)
        except ValueError as exc:
            raise UserError(f"meta.model_name={cfg.meta.model_name}: {exc}") from None

    @abc.abstractmethod
    def networks_from_config(self, cfg) -> dict[str, nn.Module]:
        """``build_networks`` with the sizes of a run's config (the caller seeds the RNG)."""

    def ema_networks(self, networks: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """Frozen deep copies of the modules named in ``ema`` (build them before wrapping)."""
        copies = {}
        for name, path in self.ema.items():
            copies[name] = copy.deepcopy(resolve(networks, path))
            for p in copies[name].parameters():
                p.requires_grad_(False)
        return copies

    @staticmethod
    @torch.no_grad()
    def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, parameter by parameter."""
        for t, o in zip(target.parameters(), online.parameters()):
            t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)

    @abc.abstractmethod
    def __call__(self, networks: Mapping[str, nn.Module], batch: Mapping[str, torch.Tensor]):
        """(loss, metrics) of one batch; ``networks`` holds the trained and the EMA networks."""
