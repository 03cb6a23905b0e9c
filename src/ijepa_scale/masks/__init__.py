"""Mask samplers for I-JEPA pretraining, and the seeded draws every resumable random choice uses."""

from ijepa_scale.masks.multiblock import MultiBlockMaskCollator
from ijepa_scale.masks.seeded import hash_ints, seeded_generator

__all__ = ["MultiBlockMaskCollator", "hash_ints", "seeded_generator"]
