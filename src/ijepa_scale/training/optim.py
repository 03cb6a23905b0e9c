"""The optimizer as official: AdamW with weight decay on >=2-D non-bias weights only."""

from __future__ import annotations

import torch

from ..distributed.parallel import unwrap


def official_param_groups(*modules: torch.nn.Module) -> list[dict]:
    """AdamW groups as official: weight decay on >=2-D non-bias weights only (flag WD_exclude); one
    decayed and one excluded group per module, in the order given."""

    def decayed(module):
        return [p for n, p in module.named_parameters() if "bias" not in n and p.ndim != 1]

    def excluded(module):
        return [p for n, p in module.named_parameters() if "bias" in n or p.ndim == 1]

    return ([{"params": decayed(m)} for m in modules]
            + [{"params": excluded(m), "WD_exclude": True, "weight_decay": 0} for m in modules])


def make_optimizer(*modules: torch.nn.Module) -> torch.optim.AdamW:
    # foreach: a few multi-tensor kernels instead of ~10 small ops per parameter (torch picks the
    # per-parameter loop on CPU by default); the same arithmetic, so the same losses.
    return torch.optim.AdamW(official_param_groups(*(unwrap(m) for m in modules)), foreach=True)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """This step's lr on every group, and its weight decay on the groups not flagged WD_exclude."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("WD_exclude", False):
            group["weight_decay"] = wd
