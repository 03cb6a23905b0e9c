"""Warn when collapse metrics stay below their thresholds for several consecutive progress lines."""

from __future__ import annotations

import logging
import math

logger = logging.getLogger("ijepa_scale")


class CollapseMonitor:
    def __init__(self, thresholds: dict[str, float], patience: int):
        """`thresholds`: metric name -> lower bound (0 disables that metric)."""
        self.thresholds = {name: t for name, t in thresholds.items() if t > 0}
        self.patience = patience
        self.below = {name: 0 for name in self.thresholds}

    def update(self, metrics: dict, step: int) -> list[str]:
        """Count consecutive lows; returns (and logs) the warnings due at this progress line."""
        warnings = []
        for name, threshold in self.thresholds.items():
            value = metrics.get(name)
            if value is None or not math.isfinite(value):
                continue  # a skipped step says nothing either way
            self.below[name] = self.below[name] + 1 if value < threshold else 0
            if self.below[name] == self.patience:  # once per episode below the threshold
                warnings.append(
                    f"possible collapse at step {step}: {name} = {value:.4g} has been below {threshold:g} for "
                    f"{self.patience} consecutive progress lines (threshold collapse.thresholds.{name})"
                )
        for message in warnings:
            logger.warning(message)
        return warnings

    def state_dict(self) -> dict:
        return {"below": dict(self.below)}

    def load_state_dict(self, state: dict) -> None:
        for name, count in state.get("below", {}).items():
            if name in self.below:
                self.below[name] = int(count)

