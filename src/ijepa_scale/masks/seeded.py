"""Seeded draws: random numbers that are a pure function of integers such as (stream, seed, step, rank).

Every draw that must repeat after a resume (masks, views, an objective's noise) seeds its generator
here, from the integers that identify it, never from the global RNG: the data loader draws from
that too, at other points after a resume. Give each kind of draw its own `stream` constant so two
kinds never share a sequence for the same (seed, step, rank).
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15
_START = 0x6A09E667F3BCC909


def splitmix64(x: int) -> int:
    x = (x + GOLDEN64) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def hash_ints(*values: int) -> int:
    """A 64-bit seed mixed from `values` (order matters; negative values are taken modulo 2**64)."""
    h = _START
    for v in values:
        h = splitmix64(h ^ (int(v) & MASK64))
    return h


def seeded_generator(*values: int) -> torch.Generator:
    """A CPU generator seeded by hash_ints(*values)."""
    return torch.Generator().manual_seed(hash_ints(*values))
