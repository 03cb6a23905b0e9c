"""Mask samplers for I-JEPA pretraining."""

from ijepa_scale.masks.multiblock import MultiBlockMaskCollator

__all__ = ["MultiBlockMaskCollator"]
