"""Per-iteration schedules with the official formulas, as pure functions of the step.

Each schedule keeps only its step count, so resuming is exact and cheap (the
official code replays `start_epoch * ipe` scheduler steps instead).
"""

from __future__ import annotations

import math


class _StepSchedule:
    """A schedule whose value is a pure function of its step count; the count is its whole state."""

    step_count: int

    def value(self, step: int) -> float:
        raise NotImplementedError

    def step(self) -> float:
        # Stepped before each iteration, so the first iteration uses value(1), as official.
        self.step_count += 1
        return self.value(self.step_count)

    def state_dict(self) -> dict:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])


class WarmupCosineLR(_StepSchedule):
    """Linear warmup from start_lr to ref_lr, then cosine to final_lr (official WarmupCosineSchedule)."""

    def __init__(self, warmup_steps: int, start_lr: float, ref_lr: float, total_steps: int, final_lr: float = 0.0):
        self.warmup_steps = warmup_steps
        self.start_lr = start_lr
        self.ref_lr = ref_lr
        self.final_lr = final_lr
        self.cosine_steps = total_steps - warmup_steps
        self.step_count = 0

    def value(self, step: int) -> float:
        if step < self.warmup_steps:
            progress = step / max(1, self.warmup_steps)
            return self.start_lr + progress * (self.ref_lr - self.start_lr)
        progress = (step - self.warmup_steps) / max(1, self.cosine_steps)
        cosine = self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_lr, cosine)


class CosineWD(_StepSchedule):
    """Cosine from ref_wd to final_wd over total_steps, clamped at final_wd (official CosineWDSchedule)."""

    def __init__(self, ref_wd: float, total_steps: int, final_wd: float = 0.0):
        self.ref_wd = ref_wd
        self.final_wd = final_wd
        self.total_steps = total_steps
        self.step_count = 0

    def value(self, step: int) -> float:
        progress = step / max(1, self.total_steps)
        wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_wd, wd) if self.final_wd <= self.ref_wd else min(self.final_wd, wd)


class LinearMomentum(_StepSchedule):
    """EMA momentum rising linearly from start to end over total_steps.

    The official generator yields int(total)+1 values and raises StopIteration
    past them; this one stays at `end` instead.
    """

    def __init__(self, start: float, end: float, total_steps: float):
        self.start = start
        self.end = end
        self.total_steps = total_steps
        self.step_count = 0

    def value(self, step: int) -> float:
        if step >= self.total_steps:
            return self.end
        return self.start + step * (self.end - self.start) / self.total_steps

    def step(self) -> float:
        # Official: next() of a generator starting at i = 0, so the first value is `start`.
        value = self.value(self.step_count)
        self.step_count += 1
        return value


def build_schedules(opt_cfg, steps_per_epoch: int):
    total = int(opt_cfg.ipe_scale * opt_cfg.epochs * steps_per_epoch)
    lr = WarmupCosineLR(
        warmup_steps=int(opt_cfg.warmup * steps_per_epoch),
        start_lr=opt_cfg.start_lr,
        ref_lr=opt_cfg.lr,
        final_lr=opt_cfg.final_lr,
        total_steps=total,
    )
    wd = CosineWD(ref_wd=opt_cfg.weight_decay, final_wd=opt_cfg.final_weight_decay, total_steps=total)
    momentum = LinearMomentum(opt_cfg.ema[0], opt_cfg.ema[1], steps_per_epoch * opt_cfg.epochs * opt_cfg.ipe_scale)
    return lr, wd, momentum
