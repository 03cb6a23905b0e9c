"""How a data-stream batch becomes an objective's inputs: each objective builds its own preparation
(``Objective.batches(cfg, rank)``); the trainer only moves images to the device and calls it.

Everything random here is drawn from (seed, micro-batch index, rank) through ``masks.seeded``, never
from the global RNG (which the data loader also draws from, at other points after a resume), so a
resumed run prepares the same inputs.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..masks.seeded import seeded_generator

# Keeps an objective's noise apart from the mask and view streams for the same (seed, draw, rank).
NOISE_STREAM = 0x9A7E5


class Batches:
    """Images only; with ``random_per_step`` the inputs also carry a seeded ``generator``.

    ``collator``: what the data stream samples for each batch (None: nothing); ``metric_names``: what
    ``metrics`` reports of a batch (CSV columns), shown in TensorBoard under ``metric_group``.
    """

    collator = None
    metric_names: tuple[str, ...] = ()
    metric_group = "batch"

    def __init__(self, seed: int, rank: int, random_per_step: bool = False):
        self.seed, self.rank, self.random_per_step = seed, rank, random_per_step

    def inputs(self, images: torch.Tensor, batch: dict, draw: int) -> dict:
        """The objective's inputs for normalised `images` (on the device) of stream batch `batch`;
        `draw` numbers the micro-batch over the whole run."""
        inputs = {"images": images, **self.extra_inputs(images, batch, draw)}
        if self.random_per_step:
            inputs["generator"] = seeded_generator(NOISE_STREAM, self.seed, draw, self.rank)
        return inputs

    def extra_inputs(self, images: torch.Tensor, batch: dict, draw: int) -> dict:
        return {}

    def metrics(self, inputs: dict) -> dict:
        """This batch's own facts for the log (e.g. mask sizes), by ``metric_names``."""
        return {}

    def describe(self, metrics: dict) -> str:
        """Those facts for the progress line ('' for none)."""
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MaskBatches(Batches):
    """Images plus the multi-block masks the data stream sampled with ``collator``."""

    metric_names = ("mask-A", "mask-B")
    metric_group = "masks"

    def __init__(self, collator, seed: int, rank: int, random_per_step: bool = False):
        super().__init__(seed, rank, random_per_step)
        self.collator = collator

    def extra_inputs(self, images: torch.Tensor, batch: dict, draw: int) -> dict:
        return {key: [m.to(images.device, non_blocking=True) for m in batch[key]]
                for key in ("masks_enc", "masks_pred")}

    def metrics(self, inputs: dict) -> dict:
        """Patches kept per context block (mask-A) and per target block (mask-B), as official."""
        return {"mask-A": int(inputs["masks_enc"][0].shape[1]), "mask-B": int(inputs["masks_pred"][0].shape[1])}

    def describe(self, metrics: dict) -> str:
        return f" | masks {metrics['mask-A']}/{metrics['mask-B']}"

    def state_dict(self) -> dict:
        return self.collator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.collator.load_state_dict(state)


class ViewBatches(Batches):
    """Images plus the entries `views(images, step=draw, rank=rank)` makes of them."""

    def __init__(self, views: Callable, seed: int, rank: int, random_per_step: bool = False):
        super().__init__(seed, rank, random_per_step)
        self.views = views

    def extra_inputs(self, images: torch.Tensor, batch: dict, draw: int) -> dict:
        return self.views(images, step=draw, rank=self.rank)

