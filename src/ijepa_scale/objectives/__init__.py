"""Training objectives: what the loss is and what it needs from the models."""

from .ijepa import IJEPAObjective, build_objective

__all__ = ["IJEPAObjective", "build_objective"]
