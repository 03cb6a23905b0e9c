"""The per-rank batch stream: exactly-once epochs, equal steps per rank, exact resume.

Epoch plan (a pure function of seed, epoch, world size, batch size, workers):
- the source's epoch order is cut into `world` contiguous slices of
  `steps_per_epoch * batch_size` samples, one per rank; the remainder
  (fewer than world * batch_size samples, different each epoch) is dropped,
  like DistributedSampler with drop_last;
- a rank's slice is cut into `num_workers` contiguous runs of whole batches;
  worker w owns the batches k = w, w + W, w + 2W, ... of the rank's epoch, which
  is exactly the order in which torch's DataLoader takes batches from its
  workers, so batch k is always the same samples whatever the process timing;
- inside a worker's run, samples are shuffled in blocks of `shuffle_buffer`
  (the block permutation depends on the absolute position only).

The state is (epoch, batches consumed in the epoch).  On resume each worker
restarts at its own next batch, re-reading at most one shuffle block.

Loader workers persist across epochs: the epoch and the first batch are written to shared
memory before each epoch's iterator starts, and every worker reads them when it restarts.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import RunFailure, UserError
from ..procutil import data_worker_init, stop_signals_blocked
from .sources import RawSample, ReadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochPlan:
    num_samples: int
    world_size: int
    batch_size: int
    num_workers: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.world_size * self.batch_size)

    @property
    def logical_workers(self) -> int:
        return max(1, self.num_workers)

    def worker_batches(self, worker: int) -> range:
        """Indices (in the rank's epoch) of the batches produced by `worker`."""
        return range(worker, self.steps_per_epoch, self.logical_workers)

    def worker_first_batch(self, worker: int) -> int:
        """Index, inside the rank slice, of the first batch of the worker's contiguous run."""
        return sum(len(self.worker_batches(w)) for w in range(worker))

    def rank_start(self, rank: int) -> int:
        return rank * self.steps_per_epoch * self.batch_size


class BadBatchError(RunFailure):
    pass


class _EpochDataset(IterableDataset):
    """Yields the batches of one epoch for one rank, starting after `start_batch`; the epoch and
    start batch are read from `position` (shared with persistent workers) at each iteration."""

    def __init__(self, stream: "DataStream", position):
        self.source = stream.source
        self.plan = stream.plan
        self.transform = stream.transform
        self.collator = stream.collator
        self.seed = stream.seed
        self.rank = stream.rank
        self.shuffle_buffer = stream.shuffle_buffer
        self.on_error = stream.on_error
        self.position = position
        self.epoch = 0
        self.start_batch = 0

    def __iter__(self):
        self.epoch, self.start_batch = int(self.position[0]), int(self.position[1])
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        # The loader asks its worker 0 first; rotate so that it is the worker owning start_batch.
        worker = (loader_worker + self.start_batch) % self.plan.logical_workers
        return self._worker_batches(worker)

    def _worker_batches(self, worker: int) -> Iterator[dict]:
        plan = self.plan
        batch_size = plan.batch_size
        batches = plan.worker_batches(worker)
        done = len(range(worker, self.start_batch, plan.logical_workers))
        run_start = plan.rank_start(self.rank) + plan.worker_first_batch(worker) * batch_size
        run_length = len(batches) * batch_size
        samples = self._shuffled_run(run_start, run_length, skip=done * batch_size)
        for local_index in range(done, len(batches)):
            k = batches[local_index]
            images, labels, keys, errors = [], [], [], []
            for _ in range(batch_size):
                position, item = next(samples)
                keys.append(getattr(item, "key", None))
                image, error = self._image(item, position)
                if error is not None:
                    if self.on_error == "fail":
                        raise BadBatchError(f"bad sample in {error[0]}: {error[1]} (data.on_error=fail)")
                    errors.append(error)
                images.append(image)
                labels.append(-1 if image is None else item.label)
            good = [(images[i], labels[i]) for i, img in enumerate(images) if img is not None]
            if not good:
                # Nothing decodable: the next good samples of this worker's run stand in, so that every
                # batch trains (every rank must run the same steps) and the choice survives a resume.
                after = (local_index + 1) * batch_size
                good = self._stand_ins(run_start, run_length, after, batch_size)
            # Keep the batch shape: skipped samples are replaced by copies of good ones, and counted.
            bad = [i for i, img in enumerate(images) if img is None]
            for j, i in enumerate(bad):
                images[i], labels[i] = good[j % len(good)]
            batch_images = torch.stack(images)
            step = self.epoch * plan.steps_per_epoch + k
            masks_enc, masks_pred = [], []
            if self.collator is not None:  # objectives without masks (gated, saccade) have none
                masks_enc, masks_pred = self.collator.sample(batch_size, step=step, rank=self.rank)
            yield {
                "images": batch_images,
                "labels": torch.tensor(labels, dtype=torch.long),
                "keys": keys,
                "masks_enc": masks_enc,
                "masks_pred": masks_pred,
                "epoch": self.epoch,
                "batch": k,
                "errors": errors,
            }

    def _image(self, item, position: int):
        """(image tensor, None), or (None, (source, why)) for a sample that cannot be used."""
        if isinstance(item, ReadError):
            return None, (item.source, item.message)
        try:
            return self._decode(item, position), None
        except Exception as exc:
            return None, (item.source, f"cannot decode sample {item.key!r}: {type(exc).__name__}: {exc}")

    def _stand_ins(self, run_start: int, run_length: int, after: int, wanted: int) -> list:
        """Up to `wanted` (image, label) decodable in the worker's run, the first after sample `after`,
        wrapping around to the run's start (a rare path: the run is read again)."""
        found = []
        for skip, stop in ((after, run_length), (0, after)):
            reader = self._shuffled_run(run_start, run_length, skip)
            for position, item in itertools.islice(reader, stop - skip):
                image, _ = self._image(item, position)
                if image is not None:
                    found.append((image, item.label))
                    if len(found) == wanted:
                        return found
            if found:
                return found
        raise BadBatchError(f"no decodable sample in the {run_length} samples of rank {self.rank}'s data loader "
                            f"worker in epoch {self.epoch + 1}: check the shards")

    def _decode(self, item: RawSample, position: int) -> torch.Tensor:
        from .transforms import open_image

        rng = random.Random(f"{self.seed}/{self.epoch}/{position}")
        return self.transform(open_image(item.data), rng)

    def _shuffled_run(self, run_start: int, run_length: int, skip: int):
        """Yield (position, item) for the worker's run in shuffled order, skipping the first `skip`.

        The run is read as one contiguous stream (each shard opened once); the shuffle
        permutes blocks of `shuffle_buffer` samples aligned to the run start, so a resume
        only re-reads the block it stopped in.
        """
        # A source without in-stream shuffling is already shuffled per sample: no buffer needed.
        block = max(1, self.shuffle_buffer if self.source.shuffle_in_stream else 1)
        run_stop = run_start + run_length
        first_block_start = run_start + (skip // block) * block
        reader = self.source.read_range(self.seed, self.epoch, first_block_start, run_stop)
        begin = skip % block
        for block_start in range(first_block_start, run_stop, block):
            block_stop = min(block_start + block, run_stop)
            items = list(itertools.islice(reader, block_stop - block_start))
            assert len(items) == block_stop - block_start, "source returned too few samples"
            order = list(range(len(items)))
            if self.source.shuffle_in_stream:
                random.Random(f"{self.seed}/{self.epoch}/block/{block_start}").shuffle(order)
            for i in order[begin:]:
                yield block_start + i, items[i]
            begin = 0


def _worker_context():
    # Fork starts workers in milliseconds; a rank started with "spawn" would otherwise
    # re-import torch in every worker at every epoch.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else methods[0])


def _shut_down(iterator) -> None:
    # Workers ignore SIGTERM (see data_worker_init), so the loader's terminate() cannot stop
    # one that is stuck, and multiprocessing's exit hook would then wait for it forever.
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(iterator, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


class DataStream:
    """Batches for one rank, with `state_dict`/`load_state_dict` for exact resume."""

    def __init__(self, source, transform, collator, *, batch_size: int, num_workers: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: int = 1000, on_error: str = "skip",
                 pin_memory: bool = False):
        self.source = source
        self.transform = transform
        self.collator = collator
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.on_error = on_error
        self.pin_memory = pin_memory
        self.plan = EpochPlan(source.num_samples, world_size, batch_size, num_workers)
        if self.plan.steps_per_epoch == 0:
            raise UserError(
                f"the dataset has {source.num_samples} samples, fewer than one global batch "
                f"(world size {world_size} x data.batch_size {batch_size}); lower data.batch_size"
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        self._loader: DataLoader | None = None
        self._position = None
        self._reported: set[tuple[str, str]] = set()

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def _make_loader(self) -> DataLoader:
        workers = self.plan.num_workers
        context = _worker_context() if workers > 0 else None
        # Shared memory inherited by the workers: the epoch and first batch of each iteration.
        self._position = (context or multiprocessing).RawArray("q", 2)
        return DataLoader(
            _EpochDataset(self, self._position),
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=2 if workers > 0 else None,
            persistent_workers=workers > 0,
            worker_init_fn=functools.partial(data_worker_init, os.getpid()) if workers > 0 else None,
            multiprocessing_context=context,
        )

    def epoch_batches(self) -> Iterator[dict]:
        """Yield the remaining batches of the current epoch, then move to the next epoch.

        The loader workers stay alive for the next epoch when this one is read to its end;
        an epoch left early (a stop, an error) shuts them down, and the next call starts new ones."""
        if self._loader is None:
            self._loader = self._make_loader()
        loader = self._loader
        self._position[0], self._position[1] = self.epoch, self.batch_in_epoch
        with stop_signals_blocked():  # the workers start here (first epoch); see data_worker_init
            iterator = iter(loader)
        finished = False
        try:
            while self.batch_in_epoch < self.steps_per_epoch:
                batch = next(iterator)
                assert batch["batch"] == self.batch_in_epoch and batch["epoch"] == self.epoch, (
                    f"stream out of order: got batch {batch['batch']} of epoch {batch['epoch']}, "
                    f"expected {self.batch_in_epoch} of {self.epoch}"
                )
                self.batch_in_epoch += 1
                self._report(batch["errors"])
                yield batch
            finished = True
        finally:
            # (an abandoned generator may be collected after a newer epoch started its own loader)
            if (not finished or self.plan.num_workers == 0) and self._loader is loader:
                self.close()
            del iterator
        self.epoch += 1
        self.batch_in_epoch = 0

    def _report(self, errors: list) -> None:
        """Log each cause of skipped samples once (per source and message); every one is counted by the trainer."""
        for (source, message), n in Counter(map(tuple, errors)).items():
            if (source, message) not in self._reported:
                self._reported.add((source, message))
                logger.warning("rank %d: skipped %d sample(s) from %s: %s (more lost the same way are counted in "
                               "the skipped column, not logged)", self.rank, n, source, message)

    def close(self) -> None:
        """Stop the loader workers (they are kept between epochs otherwise)."""
        loader, self._loader = self._loader, None
        if loader is not None and getattr(loader, "_iterator", None) is not None:
            _shut_down(loader._iterator)
            loader._iterator = None

    def state_dict(self) -> dict:
        plan = self.plan
        epoch, done = self.epoch, self.batch_in_epoch
        if done >= plan.steps_per_epoch:
            epoch, done = epoch + 1, 0
        return {
            "epoch": epoch,
            "batch_in_epoch": done,
            "worker_batches_done": [len(range(w, done, plan.logical_workers)) for w in range(plan.logical_workers)],
            "rank": self.rank,
            "world_size": plan.world_size,
            "num_workers": plan.num_workers,
            "batch_size": plan.batch_size,
            "num_samples": plan.num_samples,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "source": self.source.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> bool:
        """Restore the position; returns True when the epoch layout changed (allowed at an epoch boundary)."""
        plan = self.plan
        mid_epoch = state["batch_in_epoch"] != 0
        if state["num_samples"] != plan.num_samples or state["seed"] != self.seed:
            raise UserError(
                f"the checkpoint's data stream had {state['num_samples']} samples and seed {state['seed']}; "
                f"this run has {plan.num_samples} samples and seed {self.seed}. Resume with the same data "
                f"and meta.seed, or start a new logging.folder"
            )
        changed = [
            f"{name} {state[key]} -> {now}"
            for name, key, now in (
                ("world size", "world_size", plan.world_size),
                ("data.batch_size", "batch_size", plan.batch_size),
                ("data.num_workers", "num_workers", plan.num_workers),
                ("data.shuffle_buffer", "shuffle_buffer", self.shuffle_buffer),
            )
            if state.get(key, now) != now
        ]
        if state.get("source", self.source.fingerprint()) != self.source.fingerprint():
            changed.append("the shard list (same total sample count)")
        if changed and mid_epoch:
            raise UserError(
                f"cannot resume mid-epoch (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']}) with a "
                f"different {', '.join(changed)}: the remaining samples of this epoch were assigned to the old "
                f"layout. Resume with the original settings, or from an epoch-end checkpoint"
            )
        if changed:
            logger.warning("resuming at an epoch boundary with %s", ", ".join(changed))
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        layout_keys = ("world_size", "batch_size")
        return any(state[k] != getattr(plan, k) for k in layout_keys)
