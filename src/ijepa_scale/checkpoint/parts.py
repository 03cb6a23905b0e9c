"""What a training checkpoint holds, as the objects that hold it; each has state_dict/load_state_dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..distributed.parallel import unwrap


@dataclass
class TrainingParts:
    """The stateful parts of a run.

    networks: the trained networks by name (wrapped: DDP/FSDP); ema_networks: the networks that follow
    them by EMA; schedules: lr, wd, momentum by name; stream: the data stream (epoch, position; per rank);
    batches: the objective's batch preparation (its sampler position); counters: `.step`,
    `.skipped_samples` (this rank's), `.epoch_loss()` and the other counts as state_dict(); rng: the
    process's random states (per rank).
    """

    networks: dict[str, torch.nn.Module]
    ema_networks: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scaler: Optional[Any]
    schedules: dict[str, Any]
    stream: Any
    batches: Any
    counters: Any
    rng: Any
    trainable: torch.nn.ModuleDict = field(init=False)

    def __post_init__(self):
        # The trained modules under one root, so parameter names are "encoder.*" / "predictor.*".
        self.trainable = torch.nn.ModuleDict({name: unwrap(module) for name, module in self.networks.items()})

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every network by name, unwrapped (what a single-file checkpoint stores)."""
        return {**dict(self.trainable.items()), **self.ema_networks}

    def param_names_per_group(self) -> list[list[str]]:
        names = {p: n for n, p in self.trainable.named_parameters()}
        return [[names[p] for p in group["params"]] for group in self.optimizer.param_groups]
