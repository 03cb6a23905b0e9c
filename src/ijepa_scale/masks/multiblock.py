"""Vectorised, deterministic multi-block mask sampler for I-JEPA.

Output layout and block-size rule follow the official collator
(facebookresearch/ijepa, ``src/masks/multiblock.py``):

* ``masks_enc``: list of ``nenc`` int64 tensors ``[B, K_enc]``;
* ``masks_pred``: list of ``npred`` int64 tensors ``[B, K_pred]``;
* entries are flat raster indices into the ``H x W`` patch grid, every row sorted
  ascending without duplicates.

Differences from the official implementation:

* Masks are a pure function of ``(seed, step, rank, index in batch)``. Block sizes depend
  on ``(seed, step)`` only, so they agree across ranks; with ``seed=0`` the per-step block
  sizes are the same as the official collator's (its generator is seeded with the step).
* All images of a batch are sampled at once with tensor ops; the context search draws a
  fixed number of candidate placements per relaxation level, so it always terminates.
* Two defects are fixed unless ``legacy_sampler=True``:
  (a) block corners are uniform over *all* valid placements (the official exclusive
  ``randint`` bound never lets a block touch the last row/column) and blocks may span the
  full grid height/width;
  (b) contexts longer than the batch minimum ``K_enc`` are reduced to a uniformly random
  subset of ``K_enc`` patches instead of their first ``K_enc`` patches in raster order
  (which biases context coverage toward the top-left).
"""

from __future__ import annotations

import math
import multiprocessing
from multiprocessing import context as mp_context
from numbers import Integral, Real

import torch
from torch.utils.data import default_collate

from .seeded import GOLDEN64, MASK64, hash_ints

__all__ = ["MultiBlockMaskCollator"]

# Candidate context placements drawn per image, per context mask and per relaxation level.
# The official sampler also makes 20 attempts before relaxing the target exclusion.
CONTEXT_CANDIDATES_PER_LEVEL = 20

def _size_seed(seed: int, step: int) -> int:
    # Odd multiplier keeps distinct (seed, step) pairs apart; seed=0 reduces to the
    # official seeding (generator seeded with the step counter).
    return (int(seed) * GOLDEN64 + int(step)) & MASK64


def _as_pair(value, name: str, kind=Real) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}")
    lo, hi = value
    if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, kind) or not isinstance(hi, kind):
        raise ValueError(f"{name} must contain numbers, got {value!r}")
    return lo, hi


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_range(value, name: str, upper_one: bool) -> tuple[float, float]:
    lo, hi = _as_pair(value, name)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo > hi:
        raise ValueError(f"{name} must satisfy lo <= hi, got {value!r}")
    if lo <= 0:
        raise ValueError(f"{name} values must be > 0, got {value!r}")
    if upper_one and hi > 1:
        raise ValueError(f"{name} values must lie in (0, 1], got {value!r}")
    return lo, hi


class MultiBlockMaskCollator:
    """Multi-block masking collator, a drop-in replacement for the official ``MaskCollator``.

    ``sample(batch_size, step, rank)`` is the pure sampling function; ``__call__`` collates
    a batch and samples masks for the collator's own step counter (shared across DataLoader
    workers like the official one; for bit-exact reproducibility with several workers,
    call ``sample`` with the global iteration number instead).

    Attributes ``num_relaxed`` and ``num_fallback`` count, in this process, the context
    masks for which some target exclusion had to be dropped, and those for which no
    placement kept more than ``min_keep`` patches (the placement keeping the most patches
    at the least relaxed level is used then).
    """

    def __init__(
        self,
        input_size=(224, 224),
        patch_size=16,
        enc_mask_scale=(0.2, 0.8),
        pred_mask_scale=(0.2, 0.8),
        aspect_ratio=(0.3, 3.0),
        nenc=1,
        npred=2,
        min_keep=4,
        allow_overlap=False,
        legacy_sampler=False,
        seed=0,
        rank=0,
    ):
        if isinstance(input_size, Integral) and not isinstance(input_size, bool):
            input_size = (input_size, input_size)
        in_h, in_w = _as_pair(input_size, "input_size", Integral)
        if in_h < 1 or in_w < 1:
            raise ValueError(f"input_size must be positive, got {input_size!r}")
        patch_size = _check_int(patch_size, "patch_size", 1)
        if patch_size > in_h or patch_size > in_w:
            raise ValueError(f"patch_size={patch_size} is larger than input_size={tuple(input_size)!r}")
        if not isinstance(allow_overlap, bool):
            raise ValueError(f"allow_overlap must be a bool, got {allow_overlap!r}")
        if not isinstance(legacy_sampler, bool):
            raise ValueError(f"legacy_sampler must be a bool, got {legacy_sampler!r}")

        self.input_size = (int(in_h), int(in_w))
        self.patch_size = patch_size
        self.height = self.input_size[0] // patch_size
        self.width = self.input_size[1] // patch_size
        self.enc_mask_scale = _check_range(enc_mask_scale, "enc_mask_scale", upper_one=True)
        self.pred_mask_scale = _check_range(pred_mask_scale, "pred_mask_scale", upper_one=True)
        self.aspect_ratio = _check_range(aspect_ratio, "aspect_ratio", upper_one=False)
        self.nenc = _check_int(nenc, "nenc", 1)
        self.npred = _check_int(npred, "npred", 1)
        self.min_keep = _check_int(min_keep, "min_keep", 0)
        self.allow_overlap = allow_overlap
        self.legacy_sampler = legacy_sampler
        self.seed = _check_int(seed, "seed", -(1 << 63))
        self.rank = _check_int(rank, "rank", 0)

        self.num_relaxed = 0
        self.num_fallback = 0
        # Next step to use; shared memory so DataLoader workers advance one counter.
        self._counter = multiprocessing.Value("q", 0)

    # ------------------------------------------------------------------ step counter
    def state_dict(self) -> dict:
        return {"step": int(self._counter.value)}

    def load_state_dict(self, state: dict) -> None:
        step = _check_int(state["step"], "state['step']", 0)
        with self._counter.get_lock():
            self._counter.value = step

    def step(self) -> int:
        """Consume one step and return it (official ``MaskCollator.step`` for resume loops)."""
        with self._counter.get_lock():
            value = int(self._counter.value)
            self._counter.value = value + 1
        return value

    def __getstate__(self):
        state = self.__dict__.copy()
        if mp_context.get_spawning_popen() is None:
            # Plain pickling/deepcopy: a shared Value cannot travel, keep its value.
            state["_counter"] = int(self._counter.value)
        return state

    def __setstate__(self, state):
        counter = state["_counter"]
        if isinstance(counter, int):
            state["_counter"] = multiprocessing.Value("q", counter)
        self.__dict__.update(state)

    # ------------------------------------------------------------------ block sizes
    def _block_size(self, generator: torch.Generator, scale, aspect) -> tuple[int, int]:
        r = torch.rand(1, generator=generator).item()
        area = scale[0] + r * (scale[1] - scale[0])
        max_keep = int(self.height * self.width * area)
        ratio = aspect[0] + r * (aspect[1] - aspect[0])  # same r: official correlation
        h = int(round(math.sqrt(max_keep * ratio)))
        w = int(round(math.sqrt(max_keep / ratio)))
        cap_h = self.height - 1 if self.legacy_sampler else self.height
        cap_w = self.width - 1 if self.legacy_sampler else self.width
        return max(1, min(h, cap_h)), max(1, min(w, cap_w))

    def block_sizes(self, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((h_pred, w_pred), (h_enc, w_enc))`` for a step; a function of (seed, step) only."""
        step = _check_int(step, "step", 0)
        g = torch.Generator()
        g.manual_seed(_size_seed(self.seed, step))
        pred = self._block_size(g, self.pred_mask_scale, self.aspect_ratio)
        enc = self._block_size(g, self.enc_mask_scale, (1.0, 1.0))
        return pred, enc

    def _corner_bound(self, grid: int, block: int) -> int:
        """Exclusive upper bound for a block's first row/column."""
        if self.legacy_sampler:
            return max(grid - block, 1)
        return grid - block + 1

    @staticmethod
    def _box_filter(num_positions: int, block: int, grid: int) -> torch.Tensor:
        """``[num_positions, grid]`` float indicator of the cells covered from each start."""
        start = torch.arange(num_positions).unsqueeze(1)
        cell = torch.arange(grid)
        return ((cell >= start) & (cell < start + block)).float()

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, step: int, rank: int | None = None):
        """Return ``(masks_enc, masks_pred)`` for one batch; pure in (seed, step, rank)."""
        masks_enc, masks_pred, _ = self.sample_with_info(batch_size, step, rank)
        return masks_enc, masks_pred

    def sample_with_info(self, batch_size: int, step: int, rank: int | None = None):
        """Like :meth:`sample`, plus a dict describing the draw.

        Info keys: ``pred_size`` and ``enc_size`` (block (h, w)), ``relax_level`` (``[B, nenc]``,
        number of target exclusions dropped), ``fallback`` (``[B, nenc]`` bool, no placement
        kept more than ``min_keep``) and ``context_lengths`` (``[B, nenc]``, before the
        common-length reduction).
        """
        batch_size = _check_int(batch_size, "batch_size", 1)
        step = _check_int(step, "step", 0)
        rank = self.rank if rank is None else _check_int(rank, "rank", 0)
        B, H, W = batch_size, self.height, self.width
        P, E, C = self.npred, self.nenc, CONTEXT_CANDIDATES_PER_LEVEL

        (hp, wp), (he, we) = self.block_sizes(step)
        g = torch.Generator()
        g.manual_seed(hash_ints(self.seed, step, rank))
        rows_h = torch.arange(H)
        cols_w = torch.arange(W)

        # ---- targets: P rectangles per image, unconstrained
        t_top = torch.randint(0, self._corner_bound(H, hp), (B, P), generator=g)
        t_left = torch.randint(0, self._corner_bound(W, wp), (B, P), generator=g)
        t_rows = t_top.unsqueeze(-1) + torch.arange(hp)
        t_cols = t_left.unsqueeze(-1) + torch.arange(wp)
        pred_idx = (t_rows.unsqueeze(-1) * W + t_cols.unsqueeze(-2)).reshape(B, P, hp * wp)
        masks_pred = list(pred_idx.transpose(0, 1).contiguous().unbind(0))

        # ---- allowed context region per relaxation level: [B, L, H, W] (1.0 = allowed)
        # Level r keeps the exclusion of the first P - r targets (official order of relaxing).
        if self.allow_overlap:
            allowed = torch.ones(B, 1, H, W)
        else:
            t_row_in = ((rows_h >= t_top.unsqueeze(-1)) & (rows_h < (t_top + hp).unsqueeze(-1))).float()
            t_col_in = ((cols_w >= t_left.unsqueeze(-1)) & (cols_w < (t_left + wp).unsqueeze(-1))).float()
            covered = t_row_in.unsqueeze(-1) * t_col_in.unsqueeze(-2)  # [B, P, H, W]
            allowed = torch.empty(B, P + 1, H, W)
            allowed[:, P] = 1.0
            union = covered[:, 0]
            allowed[:, P - 1] = 1.0 - union
            for k in range(1, P):
                union = torch.maximum(union, covered[:, k])
                allowed[:, P - 1 - k] = 1.0 - union
        L = allowed.shape[1]

        # ---- context candidates: allowed-patch counts for every placement via a box filter
        # (float matmul of 0/1 values: exact integer counts). Each level gets its own fresh
        # candidates, like the official sampler's new attempts after each relaxation.
        n_top, n_left = self._corner_bound(H, he), self._corner_bound(W, we)
        box_rows = self._box_filter(n_top, he, H)  # [n_top, H]
        box_cols = self._box_filter(n_left, we, W)  # [n_left, W]
        placement_counts = (box_rows @ allowed @ box_cols.T).view(B, L, n_top * n_left)
        c_top = torch.randint(0, n_top, (B, L, E * C), generator=g)
        c_left = torch.randint(0, n_left, (B, L, E * C), generator=g)
        counts = placement_counts.gather(2, c_top * n_left + c_left).view(B, L, E, C)

        valid = counts > self.min_keep
        level_ok = valid.any(-1)  # [B, L, E]
        has_valid = level_ok.any(1)  # [B, E]
        # argmax returns the first maximum: least relaxed level / first accepted candidate.
        level_valid = level_ok.to(torch.uint8).argmax(1)
        # No candidate keeps > min_keep anywhere: least relaxed level keeping >= 1 patch (the
        # last level has no exclusion, so it always qualifies) and its best candidate there.
        level_fallback = (counts.amax(-1) >= 1).to(torch.uint8).argmax(1)
        level = torch.where(has_valid, level_valid, level_fallback)  # [B, E]

        at_level = level.view(B, 1, E, 1).expand(B, 1, E, C)
        counts_lvl = counts.gather(1, at_level).squeeze(1)  # [B, E, C]
        first_valid = (counts_lvl > self.min_keep).to(torch.uint8).argmax(-1)
        most_kept = counts_lvl.argmax(-1)
        choice = torch.where(has_valid, first_valid, most_kept).unsqueeze(-1)  # [B, E, 1]
        e_top = c_top.view(B, L, E, C).gather(1, at_level).squeeze(1).gather(-1, choice)
        e_left = c_left.view(B, L, E, C).gather(1, at_level).squeeze(1).gather(-1, choice)

        e_row_in = (rows_h >= e_top) & (rows_h < e_top + he)  # [B, E, H]
        e_col_in = (cols_w >= e_left) & (cols_w < e_left + we)  # [B, E, W]
        allowed_sel = allowed[torch.arange(B).unsqueeze(-1), level] > 0.5  # [B, E, H, W]
        context = (e_row_in.unsqueeze(-1) & e_col_in.unsqueeze(-2) & allowed_sel).view(B, E, H * W)
        lengths = context.sum(-1)
        k_enc = int(lengths.min())

        # ---- common length K_enc
        if self.legacy_sampler:
            keep = context & (context.cumsum(-1) <= k_enc)  # first K_enc in raster order
            enc_idx = keep.nonzero()[:, 2].view(B, E, k_enc)
        else:
            keys = torch.rand(B, E, H * W, generator=g)
            keys.masked_fill_(~context, 2.0)
            chosen = keys.topk(k_enc, dim=-1, largest=False, sorted=False).indices
            keep = torch.zeros_like(context).scatter_(-1, chosen, True)
            enc_idx = keep.nonzero()[:, 2].view(B, E, k_enc)
        masks_enc = list(enc_idx.transpose(0, 1).contiguous().unbind(0))

        relaxed = level > 0
        fallback = ~has_valid
        self.num_relaxed += int(relaxed.sum())
        self.num_fallback += int(fallback.sum())
        info = {
            "pred_size": (hp, wp),
            "enc_size": (he, we),
            "relax_level": level,
            "fallback": fallback,
            "context_lengths": lengths,
        }
        return masks_enc, masks_pred, info

    def __call__(self, batch):
        collated = default_collate(batch)
        masks_enc, masks_pred = self.sample(len(batch), self.step())
        return collated, masks_enc, masks_pred
