"""Saving and resuming a run: the checkpoint manager the trainer calls (save / resume / wait).

It is given the run's stateful parts (``parts.TrainingParts``) and owns the checkpoint format: a
single file (``files.CheckpointFiles``) when the networks are whole on every rank, a DCP folder
(``dcp``) written by every rank under FSDP, optionally in the background. Every rank calls every
public method; rank 0 writes the files, and the ranks agree on each outcome by broadcast, so a
failed write stops every rank with the same one-line error.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import safe_load
from ..distributed import env as dist_utils
from ..distributed.parallel import unwrap
from ..errors import RunFailure, UserError
from ..schedules import build_schedules
from .architecture import (add_module_prefix, check_architecture, check_objective, loading_errors_as_user_errors,
                           strip_module_prefix)
from .dcp import TRAINER_STATE, dcp_tensor_shapes, optimizer_state_to_fqns
from .files import CheckpointFiles, atomic_save, load_checkpoint_file
from .init_from import init_from
from .parts import TrainingParts

logger = logging.getLogger("ijepa_scale")

CHECKPOINT_VERSION = 1


class CheckpointWriteError(RunFailure):
    on_every_rank = True  # rank 0 shares the outcome of its write with every rank


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError behind `exc`: torch.save reports a full disk as a RuntimeError raised while
    handling the OSError."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def describe_write_error(exc: OSError, target: Path, last_step: Optional[int]) -> str:
    """One line for a failed checkpoint write: the file, the cause, the free space, what to do."""
    folder = target.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MB free in {folder}"
    except OSError:
        free = f"free space in {folder} unknown"
    resume = (f"the previous checkpoint (step {last_step}) is intact" if last_step is not None
              else "no checkpoint of this run exists yet")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause, fix = "no space left on device", "free space (or set checkpoint.keep_last) and run the same command"
    else:
        cause, fix = exc.strerror or type(exc).__name__, "fix the folder and run the same command"
    return f"cannot write checkpoint {target}: {cause} ({free}); {resume}; {fix}"


def _clone_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tensors(v) for v in obj]
    return obj


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


class CheckpointManager:
    """`parts`: what a checkpoint holds; `objective`: names the networks for the architecture checks
    and meta.init_from; `env`: this rank and the world size; `sharded`: FSDP (DCP folders)."""

    def __init__(self, cfg, parts: TrainingParts, objective, env: dist_utils.DistEnv, *, sharded: bool,
                 steps_per_epoch: int):
        self.cfg, self.parts, self.objective, self.env = cfg, parts, objective, env
        self.sharded, self.steps_per_epoch = sharded, steps_per_epoch
        self.files = CheckpointFiles(Path(cfg.logging.folder), cfg.logging.write_tag, cfg.checkpoint.keep_last)
        self.saved_step: Optional[int] = None  # the step of the newest committed checkpoint of this process
        self.lineage: list[dict] = []
        self.resume_file: Optional[Path] = None
        self.complete = False  # resumed from a checkpoint that already holds every epoch
        self._pending_save = None  # (future, folder, periodic, step) of an asynchronous DCP save
        self._group = None
        if sharded and cfg.checkpoint.async_save:
            # Its own gloo group: the background writer's collectives must not interleave with training's.
            import datetime

            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo",
                                         timeout=datetime.timedelta(seconds=cfg.distributed.collective_timeout_s))

    @property
    def step(self) -> int:
        return self.parts.counters.step

    # ---------------------------------------------------------------- resume
    def resume(self) -> Optional[Path]:
        """Continue from this run's checkpoint (or meta.read_checkpoint), else start from meta.init_from
        if set; returns the checkpoint resumed from, or None."""
        cfg = self.cfg
        path = self.files.resolve_resume(cfg.meta.read_checkpoint, cfg.meta.load_checkpoint)
        if path is None:
            if cfg.meta.init_from:
                self.lineage = init_from(self.parts, self.objective, cfg.meta.objective, cfg.meta.init_from,
                                         with_optimizer=cfg.meta.init_optimizer, sharded=self.sharded,
                                         is_main=self.env.is_main)
            return None
        self.resume_file = path
        if path.is_dir() and self.sharded:
            state = self._load_dcp(path)
        else:
            state = load_checkpoint_file(path)
            self.load_state_dict(state)
        self.lineage = list(state.get("lineage", [])) + [{"file": path.name, "step": state.get("step")}]
        self.saved_step = self.step
        stream = self.parts.stream
        self.complete = stream.epoch >= cfg.optimization.epochs
        if self.env.is_main and not self.complete:
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, stream.epoch + 1,
                        stream.batch_in_epoch)
            self._warn_if_schedules_changed(state)
        if self.env.is_main and cfg.meta.init_from:
            logger.info("meta.init_from=%s is not applied: this run continues from its own checkpoint",
                        cfg.meta.init_from)
        return path

    def load_state_dict(self, state: dict) -> None:
        """A single-file checkpoint (or a consolidated DCP folder) into every part."""
        where = self.resume_file or "the checkpoint"
        check_objective(state.get("config"), self.cfg.meta.objective, where)
        parts = self.parts
        missing = [k for k in (*parts.networks, *parts.ema_networks, "opt") if k not in state]
        if missing:
            raise UserError(f"{where} lacks {missing}: not a training checkpoint. Resume from another file "
                            f"(meta.load_checkpoint=true meta.read_checkpoint=FILE) or use a new logging.folder")
        self._check_architecture(state, where)
        with loading_errors_as_user_errors(where):
            if self.sharded:
                self._load_full_into_shards(state)
            else:
                for name, module in parts.modules().items():
                    module.load_state_dict(strip_module_prefix(state[name]))
                parts.optimizer.load_state_dict(state["opt"])
        self._load_progress(state)

    def _check_architecture(self, state: dict, where) -> None:
        """Name each size that differs (objectives that name a ViT encoder and predictor; others fail on
        the first tensor that does not fit, also with a one-line error)."""
        names = self.objective.architecture_networks
        if names:
            encoder, predictor = (unwrap(self.parts.networks[name]) for name in names)
            check_architecture(state, encoder, predictor, where, names)

    def _load_full_into_shards(self, state: dict) -> None:
        """A single-file (unsharded) checkpoint into FSDP modules: each rank keeps its own shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        parts, options = self.parts, StateDictOptions(full_state_dict=True)
        model = {f"{key}.{k}": v for key in parts.networks for k, v in strip_module_prefix(state[key]).items()}
        opt = optimizer_state_to_fqns(state["opt"], parts.param_names_per_group())
        set_state_dict(parts.trainable, parts.optimizer, model_state_dict=model, optim_state_dict=opt,
                       options=options)
        for name, module in parts.ema_networks.items():
            set_model_state_dict(module, strip_module_prefix(state[name]), options=options)

    def _load_dcp(self, path: Path) -> dict:
        """Resume from a DCP folder: every rank reads the parts of the shards it now holds (any world size)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        parts = self.parts
        state = safe_load.load(path / TRAINER_STATE)
        check_objective(state.get("config"), self.cfg.meta.objective, path)
        shapes = dcp_tensor_shapes(path)
        # The size check reads shapes only, so a wrong architecture is named before any tensor is read.
        weights = {key: {k[len(f"model.{key}."):]: torch.empty(size, device="meta") for k, size in shapes.items()
                         if k.startswith(f"model.{key}.")} for key in parts.networks}
        self._check_architecture({**weights, "config": state.get("config")}, path)
        with loading_errors_as_user_errors(path):
            tensors = self._tensors()
            safe_load.load_dcp(tensors, path)
            set_state_dict(parts.trainable, parts.optimizer, model_state_dict=tensors["model"],
                           optim_state_dict=tensors["opt"])
            for name, module in parts.ema_networks.items():
                set_model_state_dict(module, tensors[name])
        self._load_progress(state)
        return state

    def _load_progress(self, state: dict) -> None:
        parts, counters = self.parts, self.parts.counters
        if parts.scaler is not None and state.get("scaler"):
            parts.scaler.load_state_dict(state["scaler"])
        if "step" not in state:
            # An official checkpoint: epoch granularity, schedules replayed from the epoch count.
            counters.step = int(state["epoch"]) * self.steps_per_epoch
            self._place_schedules(counters.step)
            parts.stream.epoch, parts.stream.batch_in_epoch = int(state["epoch"]), 0
            return
        counters.step = int(state["step"])
        for name, schedule in parts.schedules.items():
            schedule.load_state_dict(state["schedules"][name])
        parts.batches.load_state_dict({"step": state["mask_collator"]["step"]})
        counters.load_state_dict(state["counters"])
        per_rank = state["rank_state"]
        if len(per_rank) == self.env.world_size:
            mine = per_rank[self.env.rank]
            layout_changed = parts.stream.load_state_dict(mine["data"])
            parts.rng.load_state_dict(mine["rng"])
            counters.skipped_samples = mine["skipped_samples"]
        else:
            # Another world size: the stream refuses unless the data state is at an epoch boundary.
            layout_changed = parts.stream.load_state_dict(per_rank[0]["data"])
        if layout_changed:
            # Steps per epoch changed: continue the schedules at the same epoch position, as the
            # official code does by replaying epoch * steps_per_epoch scheduler steps.
            position = parts.stream.epoch * self.steps_per_epoch
            self._place_schedules(position)
            logger.warning("steps per epoch changed: schedules continue from epoch %d (position %d)",
                           parts.stream.epoch, position)

    def _place_schedules(self, position: int) -> None:
        for schedule in self.parts.schedules.values():
            schedule.load_state_dict({"step": position})

    def _warn_if_schedules_changed(self, state: dict) -> None:
        """Warn when the resumed run's optimization settings give other schedule values from here on."""
        saved = (state.get("config") or {}).get("optimization")
        if not isinstance(saved, dict):
            return
        fields = {f.name for f in dataclasses.fields(self.cfg.optimization)}
        ours = self.cfg.optimization
        try:
            theirs = dataclasses.replace(ours, **{k: v for k, v in saved.items() if k in fields})
            old = build_schedules(theirs, self.steps_per_epoch)
        except Exception:  # a checkpoint from another version: nothing sensible to compare
            return
        new = tuple(self.parts.schedules.values())
        position = new[0].step_count + 1
        values = [(name, o.value(position), n.value(position)) for name, o, n in zip(self.parts.schedules, old, new)]
        if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) for _, a, b in values):
            return
        changed = [f"optimization.{k} {saved[k]} -> {getattr(ours, k)}" for k in sorted(fields)
                   if k in saved and k != "stop_at_step" and _plain(saved[k]) != _plain(getattr(ours, k))]
        logger.warning("resuming with %s: the lr/wd/momentum schedules are recomputed; at step %d %s",
                       ", ".join(changed) or "changed optimization settings", position,
                       ", ".join(f"{name} {a:.4g} -> {b:.4g}" for name, a, b in values if a != b))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The full training state; every rank must call it (it gathers per-rank state).

        Under FSDP the tensors are this rank's shards, by parameter name: `model` ("encoder.*",
        "predictor.*"), each EMA network and `opt` (get_state_dict's layout), for a DCP save.
        """
        return {**self._tensors(), **self._progress_state()}

    def _tensors(self) -> dict:
        """The networks and the optimizer state (what DCP writes of a sharded run)."""
        parts = self.parts
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

            model, opt = get_state_dict(parts.trainable, parts.optimizer)
            return {"model": model, **{name: get_model_state_dict(module)
                                       for name, module in parts.ema_networks.items()}, "opt": opt}
        return {**{name: add_module_prefix(module.state_dict()) for name, module in parts.modules().items()},
                "opt": parts.optimizer.state_dict()}

    def _progress_state(self) -> dict:
        """Everything but the network and optimizer tensors."""
        parts, cfg = self.parts, self.cfg
        per_rank = dist_utils.all_gather_objects({"data": parts.stream.state_dict(), "rng": parts.rng.state_dict(),
                                                  "skipped_samples": parts.counters.skipped_samples})
        return {
            "scaler": None if parts.scaler is None else parts.scaler.state_dict(),
            "epoch": per_rank[0]["data"]["epoch"],
            "loss": parts.counters.epoch_loss(),
            "batch_size": cfg.data.batch_size,
            "world_size": self.env.world_size,
            "lr": cfg.optimization.lr,
            "step": self.step,
            "schedules": {name: schedule.state_dict() for name, schedule in parts.schedules.items()},
            "mask_collator": {**parts.batches.state_dict(), "step": self.step},
            "rank_state": per_rank,
            "counters": parts.counters.state_dict(),
            "lineage": self.lineage,
            "config": cfg.to_dict(),
            "ijepa_scale_version": CHECKPOINT_VERSION,
        }

    # ---------------------------------------------------------------- save
    def needs_save(self, periodic: Optional[Path]) -> bool:
        """False when `latest` already holds this step and no periodic file is asked for."""
        return periodic is not None or self.saved_step != self.step

    def save(self, periodic: Optional[Path] = None) -> None:
        """Write this step to `latest` (and to the periodic file or folder `periodic`); every rank learns
        whether it was committed, and a failed write is a CheckpointWriteError on every rank."""
        if self.sharded:
            self._save_dcp(periodic)
            return
        state = self.state_dict()
        error = None
        if self.env.is_main:
            try:
                path = self.files.save(state, periodic)
                logger.info("saved checkpoint %s (step %d)", path.name, self.step)
            except (OSError, RuntimeError) as exc:
                cause = _os_error_in(exc)
                if cause is None:
                    raise
                error = describe_write_error(cause, periodic or self.files.latest, self.saved_step)
        self._share_error(error)  # doubles as the barrier
        self.saved_step = self.step

    def _share_error(self, error: Optional[str]) -> None:
        error = dist_utils.broadcast_object(error)
        if error is not None:
            raise CheckpointWriteError(error)

    def _save_dcp(self, periodic: Optional[Path]) -> None:
        """Every rank writes its shards into one DCP folder; rank 0 commits it (marker, latest, retention)."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        state = self.state_dict()
        tensors = {k: state.pop(k) for k in self._tensors_keys()}
        path = self.files.dcp_path(periodic, self.step)
        error = None
        if self.env.is_main:
            try:
                self.files.begin_dcp(path)
                atomic_save(state, path / TRAINER_STATE)
            except OSError as exc:
                error = describe_write_error(exc, path, self.saved_step)
        self._share_error(error)
        if self._group is not None:
            # Staged copies: training goes on changing the live tensors while the writer thread runs.
            future = dcp.async_save(_clone_tensors(tensors), checkpoint_id=str(path), process_group=self._group)
            self._pending_save = (future, path, periodic is not None, self.step)
            self.saved_step = self.step
            return
        try:
            dcp.save(tensors, checkpoint_id=str(path))
        except Exception as exc:
            cause = _os_error_in(exc)
            if cause is None:
                raise
            error = describe_write_error(cause, path, self.saved_step)
        self._share_error(error)
        self._commit_dcp(path, periodic is not None, self.step)
        self.saved_step = self.step

    def _tensors_keys(self) -> tuple[str, ...]:
        return ("model", *self.parts.ema_networks, "opt")

    def _commit_dcp(self, path: Path, periodic: bool, step: int) -> None:
        error = None
        if self.env.is_main:
            try:
                self.files.commit_dcp(path, periodic)
                logger.info("saved checkpoint %s (step %d)", path.name, step)
            except OSError as exc:
                error = describe_write_error(exc, path, None)
        self._share_error(error)

    def wait(self) -> None:
        """Finish and commit an asynchronous save still being written (every rank must call it)."""
        if self._pending_save is None:
            return
        future, path, periodic, step = self._pending_save
        self._pending_save = None
        error = None
        try:
            future.result()
        except Exception as exc:
            cause = _os_error_in(exc)
            if cause is None:
                raise
            error = describe_write_error(cause, path, None)
        self._share_error(error)
        self._commit_dcp(path, periodic, step)

    def checkpoint_of_step(self) -> Optional[Path]:
        """The committed checkpoint (file or DCP folder) that holds the current step, if there is one."""
        self.wait()
        if self.saved_step == self.step:
            return self.files.current_latest()
        return None
