"""The I-JEPA pretraining loop, as small pieces: build, train_step, train, state_dict, close."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..distributed import env as dist_utils
from ..checkpoint import safe_load
from ..checkpoint.files import (TRAINER_STATE, CheckpointFiles, atomic_save, dcp_tensor_shapes, load_checkpoint_file,
                         optimizer_state_to_fqns)
from ..config import Config, dump_config
from ..data.sources import build_source
from ..data.stream import DataStream
from ..data.transforms import ImageTransform, normalize
from ..errors import RunFailure, UserError, one_line
from .collapse import CollapseMonitor
from ..masks import MultiBlockMaskCollator
from ..masks.multiblock import _hash_ints
from ..metrics import CSVMetrics
from ..models.vision_transformer import VIT_SIZES
from ..objectives import build_objective, resolve, saved_objective
from ..distributed.parallel import (ParallelPlan, autocast_context, ema_update_, grad_norm_and_clip_, is_sharded,
                       make_grad_scaler, no_grad_sync, parallelize, unwrap)
from ..procutil import STOP_SIGNALS
from ..schedules import build_schedules

logger = logging.getLogger("ijepa_scale")

CHECKPOINT_VERSION = 1
EVAL_COLUMN = "knn_acc"


class NonFiniteLossError(RunFailure):
    on_every_rank = True  # decided in the step's all-reduce, so every rank stops at the same step


class CheckpointWriteError(RunFailure):
    on_every_rank = True  # rank 0 shares the outcome of its write with every rank


def add_module_prefix(state_dict: dict) -> dict:
    return {f"module.{k}": v for k, v in state_dict.items()}


def strip_module_prefix(state_dict: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def official_param_groups(*modules: torch.nn.Module) -> list[dict]:
    """AdamW groups as official: weight decay on >=2-D non-bias weights only (flag WD_exclude); one
    decayed and one excluded group per module (official: encoder, predictor)."""

    def decayed(module):
        return [p for n, p in module.named_parameters() if "bias" not in n and p.ndim != 1]

    def excluded(module):
        return [p for n, p in module.named_parameters() if "bias" in n or p.ndim == 1]

    return ([{"params": decayed(m)} for m in modules]
            + [{"params": excluded(m), "WD_exclude": True, "weight_decay": 0} for m in modules])


def make_optimizer(*modules: torch.nn.Module) -> torch.optim.AdamW:
    # foreach: a few multi-tensor kernels instead of ~10 small ops per parameter (torch picks the
    # per-parameter loop on CPU by default); the same arithmetic, so the same losses.
    return torch.optim.AdamW(official_param_groups(*(unwrap(m) for m in modules)), foreach=True)


def rng_state() -> dict:
    # Plain lists and tensors only, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


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


def _blocks(state: dict, prefix: str) -> int:
    indices = {k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}
    return len([i for i in indices if i.isdigit()])


def architecture(encoder_state: dict, predictor_state: dict) -> dict:
    """Size facts readable from the weights (keys without `module.`), by the config key that sets them."""
    facts = {}
    patch = encoder_state.get("patch_embed.proj.weight")
    if patch is not None:
        facts["embed_dim"] = ("encoder width", "meta.embed_dim", int(patch.shape[0]))
        facts["patch_size"] = ("patch size", "mask.patch_size", int(patch.shape[-1]))
    pos = encoder_state.get("pos_embed")
    if pos is not None:
        facts["num_patches"] = ("patches per image", "data.crop_size", int(pos.shape[1]))
    facts["depth"] = ("encoder depth", "meta.depth", _blocks(encoder_state, "blocks."))
    facts["pred_depth"] = ("predictor depth", "meta.pred_depth", _blocks(predictor_state, "predictor_blocks."))
    embed = predictor_state.get("predictor_embed.weight")
    if embed is not None:
        facts["pred_emb_dim"] = ("predictor width", "meta.pred_emb_dim", int(embed.shape[0]))
    return facts


def check_architecture(state: dict, encoder: torch.nn.Module, predictor: torch.nn.Module, where) -> None:
    """UserError naming each size that differs between the checkpoint's weights and the config's model."""
    try:
        theirs = architecture(strip_module_prefix(state["encoder"]), strip_module_prefix(state["predictor"]))
    except (AttributeError, TypeError):
        raise UserError(f"{where}: 'encoder'/'predictor' are not state dicts; not a training checkpoint") from None
    ours = architecture(encoder.state_dict(), predictor.state_dict())
    diffs = []
    for key, (what, config_key, value) in ours.items():
        if key in theirs and theirs[key][2] != value:
            diffs.append(f"{what} {theirs[key][2]}, the config asks for {value} ({config_key})")
    saved_meta = (state.get("config") or {}).get("meta") or {}
    saved_heads = saved_meta.get("num_heads") or VIT_SIZES.get(saved_meta.get("model_name"), {}).get("num_heads")
    heads = getattr(encoder, "num_heads", None)
    if saved_heads is not None and heads is not None and saved_heads != heads:
        diffs.append(f"{saved_heads} attention heads, the config asks for {heads} (meta.num_heads)")
    if diffs:
        model = saved_meta.get("model_name")
        hint = f" (it was trained with meta.model_name={model})" if model else ""
        raise UserError(f"{where} has {'; '.join(diffs)}{hint}. Resume with the checkpoint's model settings, "
                        f"or start a new logging.folder")


SLOW_NOTICE_S = 10.0


class slow_notice:
    """Log "`what`: still waiting after N s" if the block takes longer than `after` seconds, and how
    long it took once it ends; a fast block logs nothing."""

    def __init__(self, what: str, enabled: bool = True, after: float = SLOW_NOTICE_S):
        self.what, self.enabled, self.after = what, enabled, after
        self.fired, self.timer = False, None

    def _fire(self):
        self.fired = True
        logger.info("%s: still waiting after %.0f s ...", self.what, self.after)

    def start(self) -> "slow_notice":
        import threading

        self.began = time.perf_counter()
        self.timer = threading.Timer(self.after, self._fire) if self.enabled else None
        if self.timer:
            self.timer.daemon = True
            self.timer.start()
        return self

    def stop(self) -> None:
        """End the wait; later calls do nothing."""
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if self.fired:
            self.fired = False
            logger.info("%s: done after %.1f s", self.what, time.perf_counter() - self.began)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


class TensorBoardLog:
    """Rank 0's scalars as TensorBoard event files in `{folder}/tensorboard`."""

    SCALARS = ("loss", "lr", "wd", "momentum", "grad_norm", "img_per_s", "data_ms", "mask-A", "mask-B", "time (ms)")

    def __init__(self, folder: Path, purge_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=purge_step)

    def log(self, metrics: dict, extra_names: tuple) -> None:
        step = metrics["step"]
        for name in self.SCALARS + tuple(extra_names):
            value = metrics.get(name)
            if value is not None and isinstance(value, (int, float)) and math.isfinite(value):
                group = "eval" if name == EVAL_COLUMN else ("masks" if name.startswith("mask-") else "train")
                self.writer.add_scalar(f"{group}/{name.replace(' ', '_')}", value, step)

    def close(self) -> None:
        self.writer.close()


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(0.0, seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _load_exactly(module: torch.nn.Module, weights: dict, where: str, sharded: bool = False) -> None:
    """load_state_dict, but a wrong shape or a missing/unexpected key is a UserError naming the tensor.
    With `sharded` (FSDP2 modules) every rank keeps its own shards of the full tensors given."""
    ours = module.state_dict()
    for name, value in weights.items():
        if name in ours and tuple(value.shape) != tuple(ours[name].shape):
            hint = ""
            if value.ndim and ours[name].ndim and value.shape[-1] != ours[name].shape[-1]:
                hint = " (a different width: meta.model_name / meta.embed_dim / meta.pred_emb_dim)"
            elif name.endswith("pos_embed"):
                hint = " (a different number of patches: data.crop_size / mask.patch_size)"
            elif name.endswith("patch_embed.proj.weight"):
                hint = " (a different patch size: mask.patch_size)"
            raise UserError(f"{where}: {name} has shape {list(value.shape)} there but {list(ours[name].shape)} in "
                            f"this model{hint}; set the model config to the checkpoint's architecture")
    missing = sorted(set(ours) - set(weights))
    unexpected = sorted(set(weights) - set(ours))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise UserError(f"{where}: {'; '.join(parts)} (a different depth: meta.depth / meta.pred_depth?); set the "
                        f"model config to the checkpoint's architecture")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(weights)


def _clone_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tensors(v) for v in obj]
    return obj


def max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Trainer:
    def __init__(self, cfg: Config, env: dist_utils.DistEnv, objective=None):
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.dtype = cfg.distributed.dtype
        self.folder = Path(cfg.logging.folder)
        if env.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
        dist_utils.barrier()

        # The objective says which networks are trained, which follow by EMA and what a batch carries.
        self.objective = objective if objective is not None else build_objective(cfg)
        torch.manual_seed(cfg.meta.seed)
        online = self.objective.networks_from_config(cfg)
        frozen = self.objective.ema_networks(online)
        self.plan = ParallelPlan.from_config(cfg.distributed)
        self.accum_steps = cfg.distributed.accum_steps
        self.networks = {name: parallelize(module, self.device, self.plan) for name, module in online.items()}
        self.ema_networks = {name: parallelize(module, self.device, self.plan, trainable=False)
                             for name, module in frozen.items()}
        self.sharded = is_sharded(next(iter(self.networks.values())))
        # The trainable modules under one root, so parameter names are "encoder.*" / "predictor.*".
        self._trainable = torch.nn.ModuleDict({name: unwrap(module) for name, module in self.networks.items()})
        self._pending_save = None  # (future, folder, periodic) of an asynchronous DCP save
        self._checkpoint_group = None
        if self.sharded and cfg.checkpoint.async_save:
            # Its own gloo group: the background writer's collectives must not interleave with training's.
            import torch.distributed as dist

            self._checkpoint_group = dist.new_group(backend="gloo")
        self.optimizer = make_optimizer(*online.values())
        self.scaler = make_grad_scaler(self.device, self.dtype)
        # Whatever extra metrics the objective returns are logged as CSV columns, in this order.
        self.metric_names = tuple(getattr(self.objective, "metric_names", ()))
        thresholds = {n: cfg.collapse.thresholds[n] for n in self.metric_names
                      if n in cfg.collapse.thresholds}
        self.collapse = CollapseMonitor(thresholds, cfg.collapse.patience)

        self.collator = None
        if self.objective.batch_kind == "multiblock":
            self.collator = MultiBlockMaskCollator(
                input_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size,
                enc_mask_scale=cfg.mask.enc_mask_scale, pred_mask_scale=cfg.mask.pred_mask_scale,
                aspect_ratio=cfg.mask.aspect_ratio, nenc=cfg.mask.num_enc_masks, npred=cfg.mask.num_pred_masks,
                min_keep=cfg.mask.min_keep, allow_overlap=cfg.mask.allow_overlap,
                legacy_sampler=cfg.mask.legacy_sampler, seed=cfg.meta.seed, rank=env.rank,
            )
        self.views = self.objective.make_views(cfg) if self.objective.batch_kind == "views" else None
        transform = ImageTransform(
            crop_size=cfg.data.crop_size, crop_scale=cfg.data.crop_scale,
            horizontal_flip=cfg.data.use_horizontal_flip, color_distortion=cfg.data.use_color_distortion,
            color_jitter_strength=cfg.data.color_jitter_strength, gaussian_blur=cfg.data.use_gaussian_blur,
        )
        source = self._build_source_once(cfg.data)
        self.stream = DataStream(
            source, transform, self.collator, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
            rank=env.rank, world_size=env.world_size, seed=cfg.meta.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            on_error=cfg.data.on_error, pin_memory=cfg.data.pin_mem and self.device.type == "cuda",
        )
        # Optimizer steps per epoch; an epoch's micro-batches beyond a multiple of accum_steps are not used.
        self.steps_per_epoch = self.stream.steps_per_epoch // self.accum_steps
        if self.steps_per_epoch == 0:
            raise UserError(f"distributed.accum_steps={self.accum_steps} is more than the "
                            f"{self.stream.steps_per_epoch} micro-batches per epoch; lower distributed.accum_steps or "
                            f"data.batch_size")
        self.lr_schedule, self.wd_schedule, self.momentum_schedule = build_schedules(
            cfg.optimization, self.steps_per_epoch
        )
        self.checkpoints = CheckpointFiles(self.folder, cfg.logging.write_tag, cfg.checkpoint.keep_last)
        self.eval_sources = None
        if cfg.evaluation.every_epochs or cfg.evaluation.every_steps:
            self.eval_sources = self._open_eval_sources_once(cfg.evaluation)

        self.step = 0
        # Damaged unindexed shards found while counting are logged once, by rank 0.
        self.skipped_samples = getattr(source, "startup_skipped", 0) if env.is_main else 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        self.stop_requested = False  # set locally by a signal
        self.requested_signals: set[int] = set()  # the signals behind stop_requested
        self.stop_agreed = False  # set on every rank once any rank asked to stop
        self.agreed_signals: list[str] = []  # names of the signals any rank had when they agreed
        self.lineage: list[dict] = []
        self._saved_step: Optional[int] = None

        self.complete = False  # resumed from a checkpoint that already holds every epoch
        self.resume_file: Optional[Path] = None
        resume_path = self.checkpoints.resolve_resume(cfg.meta.read_checkpoint, cfg.meta.load_checkpoint)
        if resume_path is not None:
            self.resume_file = resume_path
            if resume_path.is_dir() and self.sharded:
                state = self._load_dcp(resume_path)
            else:
                state = load_checkpoint_file(resume_path)
                self.load_state_dict(state)
            self.lineage = list(state.get("lineage", [])) + [{"file": resume_path.name, "step": state.get("step")}]
            self._saved_step = self.step
            self.complete = self.stream.epoch >= cfg.optimization.epochs
            if env.is_main and not self.complete:
                logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, self.step,
                            self.stream.epoch + 1, self.stream.batch_in_epoch)
                self._warn_if_schedules_changed(state)
            if env.is_main and cfg.meta.init_from:
                logger.info("meta.init_from=%s is not applied: this run continues from its own checkpoint",
                            cfg.meta.init_from)
        elif cfg.meta.init_from:
            self.init_from(cfg.meta.init_from, with_optimizer=cfg.meta.init_optimizer)
        if env.is_main and not self.complete:
            # Written once the run is known to go ahead, so a refused run leaves the old one in place.
            (self.folder / "params-ijepa.yaml").write_text(dump_config(cfg))
        self.metrics = CSVMetrics(self.folder / f"{cfg.logging.write_tag}_r{env.rank}.csv",
                                  resume_step=self.step if resume_path is not None else None,
                                  extra_columns=self.metric_names + (EVAL_COLUMN,))
        self.tensorboard = None
        if env.is_main and cfg.logging.tensorboard:
            self.tensorboard = TensorBoardLog(self.folder, purge_step=self.step + 1 if resume_path is not None else None)
        if env.is_main:
            logger.info("data: %s; %d steps per epoch of %d x %d images", source.describe(),
                        self.steps_per_epoch, env.world_size, cfg.data.batch_size)

    # The I-JEPA names of the networks (objectives ijepa and pkt).
    @property
    def encoder(self) -> torch.nn.Module:
        return self.networks["encoder"]

    @property
    def predictor(self) -> torch.nn.Module:
        return self.networks["predictor"]

    @property
    def target_encoder(self) -> torch.nn.Module:
        return self.ema_networks["target_encoder"]

    @property
    def eval_encoder(self) -> torch.nn.Module:
        """The network exported and evaluated (the EMA teacher of every objective)."""
        return self.ema_networks[self.objective.encoder_name]

    def _on_main_then_broadcast(self, build):
        """Run `build()` on rank 0 only (listing, counting unindexed shards) and hand its result to
        every rank; an exception is raised on every rank, so none is left waiting in a collective."""
        result = None
        if self.env.is_main:
            try:
                result = build()
            except Exception as exc:
                result = exc
        result = dist_utils.broadcast_object(result)
        if isinstance(result, Exception):
            raise result
        return result

    def _build_source_once(self, data_cfg):
        def build():
            with slow_notice(f"listing the training shards ({data_cfg.shards or data_cfg.root_path})"):
                return build_source(data_cfg)

        return self._on_main_then_broadcast(build)

    def _open_eval_sources_once(self, eval_cfg):
        """The periodic evaluation's (train, val) shard sources, listed on rank 0 like the training data."""
        from ..evaluation.evaluate import open_eval_shards

        return self._on_main_then_broadcast(
            lambda: (open_eval_shards(eval_cfg.train_shards, "evaluation.train_shards"),
                     open_eval_shards(eval_cfg.val_shards, "evaluation.val_shards")))

    # ---------------------------------------------------------------- step
    def _set_optimizer_hyperparameters(self, lr: float, wd: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd

    def _ema_update(self, momentum: float) -> None:
        for name, source in self.objective.ema.items():
            ema_update_(self.ema_networks[name].parameters(), resolve(self.networks, source).parameters(), momentum)

    def _grad_norm_and_clip(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return float(grad_norm_and_clip_(params, self.cfg.optimization.clip_grad))

    def _inputs(self, batch: dict, micro_index: int = 0) -> dict:
        """What the objective's batch kind needs, on the device."""
        images = normalize(batch["images"].to(self.device, non_blocking=True))
        inputs = {"images": images}
        if self.objective.batch_kind == "multiblock":
            inputs["masks_enc"] = [m.to(self.device, non_blocking=True) for m in batch["masks_enc"]]
            inputs["masks_pred"] = [m.to(self.device, non_blocking=True) for m in batch["masks_pred"]]
        # Views and noise are drawn from (seed, micro-batch index, rank) only, so a resumed run draws the same;
        # not from the global RNG, which the data loader also draws from, at other points after a resume.
        draw = self.step * self.accum_steps + micro_index
        if self.objective.batch_kind == "views":
            inputs.update(self.views(images, step=draw, rank=self.env.rank))
        if self.objective.random_per_step:
            inputs["generator"] = torch.Generator().manual_seed(_hash_ints(0x9A7E5, self.cfg.meta.seed, draw,
                                                                           self.env.rank))
        return inputs

    def _forward(self, batch: dict, micro_index: int = 0):
        """(loss or None, metrics, inputs) of one micro-batch."""
        inputs = self._inputs(batch, micro_index)
        loss, extra = None, {}
        if batch.get("usable", True):
            networks = {**self.networks, **self.ema_networks}
            with autocast_context(self.device, self.dtype):
                loss = self.objective(networks, inputs)
            if isinstance(loss, tuple):  # (loss, metrics); a plain loss is accepted too
                loss, extra = loss
        return loss, extra, inputs

    def _agree(self, loss, extra) -> tuple[torch.Tensor, list]:
        """One collective decides for every rank: the global mean loss, which ranks cannot step
        (non-finite loss, or no decodable sample), and whether any rank was asked to stop."""
        world = self.env.world_size
        local_ok = loss is not None and bool(torch.isfinite(loss.detach()).item())
        # The stop flags and the objective's metrics (as global means) ride in the same collective.
        metrics_at = world + 2 + len(STOP_SIGNALS)
        shared = torch.zeros(metrics_at + len(self.metric_names), dtype=torch.float64, device=self.device)
        shared[0] = loss.detach().double() / world if local_ok else 0.0
        shared[1 + self.env.rank] = 0.0 if local_ok else 1.0
        self._put_stop_flags(shared, world + 1)
        if local_ok:
            for i, name in enumerate(self.metric_names):
                shared[metrics_at + i] = torch.as_tensor(extra[name], dtype=torch.float64) / world
        dist_utils.all_reduce_sum(shared)
        shared = shared.cpu()
        bad_ranks = [r for r in range(world) if shared[1 + r] > 0]
        self._take_stop_flags(shared, world + 1)
        return shared, bad_ranks

    def train_step(self, batch: dict | list[dict]) -> dict:
        """One optimisation step on one batch, or on a list of accumulation micro-batches; returns the
        logged metrics."""
        micro = batch if isinstance(batch, list) else [batch]
        batch = micro[-1]
        lr = self.lr_schedule.step()
        wd = self.wd_schedule.step()
        momentum = self.momentum_schedule.step()
        self._set_optimizer_hyperparameters(lr, wd)

        start = time.perf_counter()
        metrics_at = self.env.world_size + 2 + len(STOP_SIGNALS)
        global_loss, metric_sums = 0.0, [0.0] * len(self.metric_names)
        bad_ranks: list = []
        mask_sizes = None
        trainable = tuple(self.networks.values())
        for i, mb in enumerate(micro):
            loss, extra, inputs = self._forward(mb, i)
            if mask_sizes is None:
                mask_sizes = ((int(inputs["masks_enc"][0].shape[1]), int(inputs["masks_pred"][0].shape[1]))
                              if "masks_enc" in inputs else (None, None))
            shared, bad_ranks = self._agree(loss, extra)
            if bad_ranks:
                break  # every rank saw the same flags, so every rank leaves here together
            global_loss += float(shared[0])
            for j in range(len(self.metric_names)):
                metric_sums[j] += float(shared[metrics_at + j])
            if len(micro) > 1:
                loss = loss / len(micro)
            with no_grad_sync(trainable, skip=i < len(micro) - 1):
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

        grad_norm = float("nan")
        skipped = bool(bad_ranks)
        if not skipped:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = self._grad_norm_and_clip()
            if self.scaler is not None:
                # The scaler skips the update itself on inf/nan gradients and lowers its scale.
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self._ema_update(momentum)
            elif math.isfinite(grad_norm):
                self.optimizer.step()
                self._ema_update(momentum)
            else:
                skipped = True
                bad_ranks = ["all (non-finite gradient)"]
        self.optimizer.zero_grad(set_to_none=True)
        if skipped and self.sharded:
            # FSDP keeps the roots' parameters gathered after forward until their backward, which a
            # skipped step never runs; reshard so state dicts and the EMA see the shards again.
            for module in self.networks.values():
                module.reshard()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_ms = (time.perf_counter() - start) * 1000.0

        self.step += 1
        n = len(micro)
        global_loss = global_loss / n if n > 1 else global_loss
        extra_metrics = {name: float("nan") if skipped else (metric_sums[i] / n if n > 1 else metric_sums[i])
                         for i, name in enumerate(self.metric_names)}
        if skipped:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            logger.warning("step %d: non-finite loss or undecodable batch on rank(s) %s; update skipped on "
                           "every rank (%d in a row)", self.step, bad_ranks, self.consecutive_nonfinite)
            if self.consecutive_nonfinite >= self.cfg.optimization.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self.consecutive_nonfinite} consecutive skipped steps (non-finite loss or gradient, or "
                    f"no decodable sample) ending at step {self.step} "
                    f"(epoch {batch['epoch'] + 1}, itr {batch['batch'] // n}); last on rank(s) {bad_ranks}. "
                    f"Lower optimization.lr, set optimization.clip_grad, or resume from an earlier checkpoint"
                )
            global_loss = float("nan")
        else:
            self.consecutive_nonfinite = 0
            self.epoch_loss_sum += global_loss
            self.epoch_loss_count += 1

        self.skipped_samples += sum(len(mb["errors"]) for mb in micro)  # the data stream logs their causes
        return {
            "epoch": batch["epoch"] + 1,
            "itr": batch["batch"] // n,
            "loss": global_loss,
            "mask-A": mask_sizes[0],
            "mask-B": mask_sizes[1],
            "time (ms)": round(compute_ms, 3),
            "step": self.step,
            "lr": lr,
            "wd": wd,
            "momentum": momentum,
            "grad_norm": grad_norm,
            "skipped": self.skipped_samples,
            "skipped_steps": self.skipped_steps,
            **extra_metrics,
        }

    # ---------------------------------------------------------------- loop
    def _log_progress(self, metrics: dict) -> None:
        avg = self.epoch_loss_sum / max(1, self.epoch_loss_count)
        masks = "" if metrics["mask-A"] is None else f" | masks {metrics['mask-A']}/{metrics['mask-B']}"
        logger.info(
            "[ep %d, itr %d/%d, step %d] loss %.4f (avg %.4f)%s | lr %.3g wd %.3g m %.5f | "
            "%.0f ms/step %.1f img/s data %.0f ms | mem %.0f MB | %s%s",
            metrics["epoch"], metrics["itr"] + 1, self.steps_per_epoch, metrics["step"], metrics["loss"], avg,
            masks, metrics["lr"], metrics["wd"], metrics["momentum"],
            metrics["time (ms)"], metrics["img_per_s"], metrics["data_ms"], metrics["max_mem_mb"],
            self._eta_text(metrics["itr"]), self._metrics_text(metrics),
        )

    def _metrics_text(self, metrics: dict) -> str:
        """The objective's metrics (and the k-NN accuracy when evaluated) for the progress line."""
        parts = [f"{name} {metrics[name]:.4g}" for name in self.metric_names]
        if metrics.get(EVAL_COLUMN) is not None:
            parts.append(f"{EVAL_COLUMN} {metrics[EVAL_COLUMN]:.4f}")
        return " | " + " ".join(parts) if parts else ""

    def _eval_due(self, epoch: int, last_in_epoch: bool) -> bool:
        every_epochs, every_steps = self.cfg.evaluation.every_epochs, self.cfg.evaluation.every_steps
        if self.eval_sources is None:
            return False
        return bool((every_steps and self.step % every_steps == 0)
                    or (every_epochs and last_in_epoch and epoch % every_epochs == 0))

    def evaluate_knn(self) -> float:
        """k-NN accuracy of the target encoder on the eval shards (every rank must call it).

        Training is left exactly as it was: the RNG states are restored afterwards and the
        training data stream is not touched, so a run with evaluation resumes bit for bit.
        """
        from ..evaluation.evaluate import evaluate

        saved = rng_state()
        start = time.perf_counter()
        try:
            result = evaluate(self.eval_encoder, *self.eval_sources, ("knn",),
                              crop_size=self.objective.input_size(self.cfg.data.crop_size),
                              batch_size=self.cfg.data.batch_size, num_workers=self.cfg.data.num_workers,
                              device=self.device, rank=self.env.rank, world_size=self.env.world_size)
        finally:
            set_rng_state(saved)
        if self.env.is_main:
            logger.info("step %d: k-NN accuracy of the target encoder %.4f (%d train / %d val images, %.1f s)",
                        self.step, result["knn"], result["n_train"], result["n_val"], time.perf_counter() - start)
        return result["knn"]

    def train(self) -> bool:
        """Train to the configured number of epochs; returns False if stopped early by a signal."""
        epochs = self.cfg.optimization.epochs
        if self.complete:
            if self.env.is_main:
                logger.info("run complete: all %d epochs (step %d) are already in %s; nothing to train. To train "
                            "further, raise optimization.epochs (e.g. optimization.epochs=%d)", epochs, self.step,
                            self.folder, 2 * epochs)
            return True
        every_steps = self.cfg.checkpoint.every_steps
        global_batch = self.env.world_size * self.cfg.data.batch_size
        self._session = {"began": time.perf_counter(), "first_step": self.step, "timed_from": None}
        first_batch = slow_notice("waiting for the first batch (decoding, workers starting)",
                                  self.env.is_main).start()
        while self.stream.epoch < epochs:
            if self._should_stop():
                first_batch.stop()
                return self._stop(periodic=None)
            if self.stream.batch_in_epoch == 0:
                self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
            wait_start = time.perf_counter()
            micro: list[dict] = []
            for batch in self.stream.epoch_batches():
                first_batch.stop()
                if batch["batch"] >= self.steps_per_epoch * self.accum_steps:
                    continue  # the epoch's tail that does not fill an optimizer step
                micro.append(batch)
                if len(micro) < self.accum_steps:
                    continue
                data_ms = (time.perf_counter() - wait_start) * 1000.0
                metrics = self.train_step(micro if self.accum_steps > 1 else batch)
                micro = []
                step_s = time.perf_counter() - wait_start
                metrics.update(data_ms=round(data_ms, 3), img_per_s=round(global_batch / step_s, 3),
                               max_mem_mb=round(max_memory_mb(self.device), 1))
                last_in_epoch = batch["batch"] == self.stream.steps_per_epoch - 1
                knn = self.evaluate_knn() if self._eval_due(metrics["epoch"], last_in_epoch) else None
                metrics[EVAL_COLUMN] = knn if self.env.is_main else None
                self.metrics.log(**metrics)
                if self.tensorboard is not None:
                    self.tensorboard.log(metrics, self.metric_names + (EVAL_COLUMN,))
                if self._session["timed_from"] is None:  # the first step includes start-up: ETA from the next
                    self._session["timed_from"] = (time.perf_counter(), self.step)
                progress_line = self.step % self.cfg.logging.log_freq == 0 or self.step == 1
                if self.env.is_main and (progress_line or knn is not None or not math.isfinite(metrics["loss"])):
                    self._log_progress(metrics)
                if self.env.is_main and progress_line:
                    self.collapse.update(metrics, self.step)
                if self._should_stop():
                    return self._stop(periodic=self._epoch_end_path() if last_in_epoch else None)
                if every_steps and self.step % every_steps == 0 and not last_in_epoch:
                    self.save(periodic=self.checkpoints.step_path(self.step))
                wait_start = time.perf_counter()
            self.save(periodic=self._epoch_end_path())
            if self.env.is_main:
                logger.info("epoch %d done: avg loss %.5f", self.stream.epoch,
                            self.epoch_loss_sum / max(1, self.epoch_loss_count))
        first_batch.stop()
        self.wait_for_checkpoint()
        self._log_summary("run finished")
        return True

    def _seconds_per_step(self) -> float:
        timed = getattr(self, "_session", {}).get("timed_from")
        if not timed or self.step <= timed[1]:
            return float("nan")
        return (time.perf_counter() - timed[0]) / (self.step - timed[1])

    def _eta_text(self, itr: int) -> str:
        per_step = self._seconds_per_step()
        total = self.cfg.optimization.epochs * self.steps_per_epoch
        if self.cfg.optimization.stop_at_step:
            total = min(total, self.cfg.optimization.stop_at_step)
        epoch_left = (self.steps_per_epoch - itr - 1) * per_step
        return f"ETA epoch {format_eta(epoch_left)} run {format_eta((total - self.step) * per_step)}"

    def _log_summary(self, how: str) -> None:
        """Rank 0's end-of-run line: steps, time, images/s, final loss, the checkpoint."""
        session = getattr(self, "_session", None)
        if not self.env.is_main or session is None:
            return
        steps = self.step - session["first_step"]
        seconds = time.perf_counter() - session["began"]
        images = steps * self.env.world_size * self.cfg.data.batch_size
        checkpoint = self.checkpoint_of_step()
        logger.info("%s: %d steps in this session (step %d of %d, epoch %d), %s, %.1f img/s; final epoch-average "
                    "loss %.5f; checkpoint %s; report: ijepa-scale report %s", how, steps, self.step,
                    self.cfg.optimization.epochs * self.steps_per_epoch, self.stream.epoch,
                    format_eta(seconds) if seconds >= 60 else f"{seconds:.1f}s",
                    images / max(seconds, 1e-9), self.epoch_loss_sum / max(1, self.epoch_loss_count),
                    checkpoint or "none", self.folder)

    def _epoch_end_path(self) -> Optional[Path]:
        """The -ep{N} file for the epoch that ends with the current step, if it is kept."""
        epochs_done = self.stream.state_dict()["epoch"]
        keep = epochs_done % self.cfg.logging.checkpoint_freq == 0 or epochs_done == self.cfg.optimization.epochs
        return self.checkpoints.epoch_path(epochs_done) if keep else None

    def _should_stop(self) -> bool:
        stop_at = self.cfg.optimization.stop_at_step
        return self.stop_agreed or bool(stop_at and self.step >= stop_at)

    def _stop(self, periodic: Optional[Path]) -> bool:
        trained = self._saved_step != self.step
        self.save(periodic=periodic)
        self.wait_for_checkpoint()
        if not self.env.is_main:
            return False
        stop_at = self.cfg.optimization.stop_at_step
        self._log_summary("run stopped")
        if self.stop_agreed:
            logger.info("stopped on request (%s) at step %d, checkpoint saved; run the same command to resume",
                        ", ".join(self.agreed_signals) or "stop", self.step)
        elif trained:
            logger.info("stopped at optimization.stop_at_step=%d (step %d), checkpoint saved; to continue, raise "
                        "or remove optimization.stop_at_step", stop_at, self.step)
        else:
            logger.info("nothing to train: the checkpoint is at step %d and optimization.stop_at_step=%d; to "
                        "continue, raise or remove optimization.stop_at_step", self.step, stop_at)
        return False

    # ---------------------------------------------------------------- state
    def _local_state(self) -> dict:
        return {"data": self.stream.state_dict(), "rng": rng_state(), "skipped_samples": self.skipped_samples}

    def state_dict(self) -> dict:
        """The full training state; every rank must call it (it gathers per-rank state).

        Under FSDP the tensors are this rank's shards, by parameter name: `model` ("encoder.*",
        "predictor.*"), `target_encoder` and `opt` (get_state_dict's layout), for a DCP save.
        """
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

            model, opt = get_state_dict(self._trainable, self.optimizer)
            tensors = {"model": model, **{name: get_model_state_dict(module)
                                          for name, module in self.ema_networks.items()}, "opt": opt}
        else:
            tensors = {
                **{name: add_module_prefix(unwrap(module).state_dict()) for name, module in self.networks.items()},
                **{name: add_module_prefix(module.state_dict()) for name, module in self.ema_networks.items()},
                "opt": self.optimizer.state_dict(),
            }
        return {**tensors, **self._progress_state()}

    def _progress_state(self) -> dict:
        """Everything but the model and optimizer tensors."""
        per_rank = dist_utils.all_gather_objects(self._local_state())
        return {
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "epoch": per_rank[0]["data"]["epoch"],
            "loss": self.epoch_loss_sum / max(1, self.epoch_loss_count),
            "batch_size": self.cfg.data.batch_size,
            "world_size": self.env.world_size,
            "lr": self.cfg.optimization.lr,
            "step": self.step,
            "schedules": {
                "lr": self.lr_schedule.state_dict(),
                "wd": self.wd_schedule.state_dict(),
                "momentum": self.momentum_schedule.state_dict(),
            },
            "mask_collator": {**(self.collator.state_dict() if self.collator else {}), "step": self.step},
            "rank_state": per_rank,
            "counters": {
                "skipped_steps": self.skipped_steps,
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "epoch_loss_sum": self.epoch_loss_sum,
                "epoch_loss_count": self.epoch_loss_count,
                "collapse": self.collapse.state_dict(),
            },
            "lineage": self.lineage,
            "config": self.cfg.to_dict(),
            "ijepa_scale_version": CHECKPOINT_VERSION,
        }

    def load_state_dict(self, state: dict) -> None:
        where = self.resume_file or "the checkpoint"
        self._check_objective(state.get("config"), where)
        missing = [k for k in (*self.networks, *self.ema_networks, "opt") if k not in state]
        if missing:
            raise UserError(f"{where} lacks {missing}: not a training checkpoint. Resume from another file "
                            f"(meta.load_checkpoint=true meta.read_checkpoint=FILE) or use a new logging.folder")
        self._check_architecture(state, where)
        with self._loading_errors_as_user_errors(where):
            if self.sharded:
                self._load_full_into_shards(state)
            else:
                for name, module in self.networks.items():
                    unwrap(module).load_state_dict(strip_module_prefix(state[name]))
                for name, module in self.ema_networks.items():
                    module.load_state_dict(strip_module_prefix(state[name]))
                self.optimizer.load_state_dict(state["opt"])
        self._load_progress(state)

    def _check_objective(self, saved_config, where) -> None:
        saved = saved_objective(saved_config)
        if saved != self.cfg.meta.objective:
            raise UserError(f"{where} was trained with meta.objective={saved}, this config sets meta.objective="
                            f"{self.cfg.meta.objective}; resume with meta.objective={saved} or use a new logging.folder")

    def _check_architecture(self, state: dict, where) -> None:
        """Name each size that differs (objectives with the I-JEPA networks; others fail on the first
        tensor that does not fit, also with a one-line error)."""
        if "encoder" in self.networks and "predictor" in self.networks:
            check_architecture(state, unwrap(self.encoder), unwrap(self.predictor), where)

    @contextlib.contextmanager
    def _loading_errors_as_user_errors(self, where):
        try:
            yield
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"{where} does not fit this model/optimizer ({type(exc).__name__}: {first}); "
                            f"resume with the checkpoint's config or use a new logging.folder") from None

    def _param_names_per_group(self) -> list[list[str]]:
        names = {p: n for n, p in self._trainable.named_parameters()}
        return [[names[p] for p in group["params"]] for group in self.optimizer.param_groups]

    def _load_full_into_shards(self, state: dict) -> None:
        """A single-file (unsharded) checkpoint into FSDP modules: each rank keeps its own shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        model = {f"{key}.{k}": v for key in self.networks for k, v in strip_module_prefix(state[key]).items()}
        opt = optimizer_state_to_fqns(state["opt"], self._param_names_per_group())
        set_state_dict(self._trainable, self.optimizer, model_state_dict=model, optim_state_dict=opt, options=options)
        for name, module in self.ema_networks.items():
            set_model_state_dict(module, strip_module_prefix(state[name]), options=options)

    def _load_dcp(self, path: Path) -> dict:
        """Resume from a DCP folder: every rank reads the parts of the shards it now holds (any world size)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        state = safe_load.load(path / TRAINER_STATE)
        self._check_objective(state.get("config"), path)
        shapes = dcp_tensor_shapes(path)
        # The size check reads shapes only, so a wrong architecture is named before any tensor is read.
        weights = {key: {k[len(f"model.{key}."):]: torch.empty(size, device="meta") for k, size in shapes.items()
                         if k.startswith(f"model.{key}.")} for key in self.networks}
        self._check_architecture({**weights, "config": state.get("config")}, path)
        with self._loading_errors_as_user_errors(path):
            tensors = self.state_dict()
            tensors = {k: tensors[k] for k in self._tensor_keys()}
            safe_load.load_dcp(tensors, path)
            set_state_dict(self._trainable, self.optimizer, model_state_dict=tensors["model"],
                           optim_state_dict=tensors["opt"])
            for name, module in self.ema_networks.items():
                set_model_state_dict(module, tensors[name])
        self._load_progress(state)
        return state

    def _load_progress(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if "step" not in state:
            # An official checkpoint: epoch granularity, schedules replayed from the epoch count.
            self.step = int(state["epoch"]) * self.steps_per_epoch
            for schedule in (self.lr_schedule, self.wd_schedule, self.momentum_schedule):
                schedule.load_state_dict({"step": self.step})
            self.stream.epoch, self.stream.batch_in_epoch = int(state["epoch"]), 0
            return
        self.step = int(state["step"])
        self.lr_schedule.load_state_dict(state["schedules"]["lr"])
        self.wd_schedule.load_state_dict(state["schedules"]["wd"])
        self.momentum_schedule.load_state_dict(state["schedules"]["momentum"])
        if self.collator is not None:
            self.collator.load_state_dict({"step": state["mask_collator"]["step"]})
        counters = state["counters"]
        self.skipped_steps = counters["skipped_steps"]
        self.consecutive_nonfinite = counters["consecutive_nonfinite"]
        self.epoch_loss_sum = counters["epoch_loss_sum"]
        self.epoch_loss_count = counters["epoch_loss_count"]
        self.collapse.load_state_dict(counters.get("collapse", {}))
        per_rank = state["rank_state"]
        if len(per_rank) == self.env.world_size:
            mine = per_rank[self.env.rank]
            layout_changed = self.stream.load_state_dict(mine["data"])
            set_rng_state(mine["rng"])
            self.skipped_samples = mine["skipped_samples"]
        else:
            # Another world size: the stream refuses unless the data state is at an epoch boundary.
            layout_changed = self.stream.load_state_dict(per_rank[0]["data"])
        if layout_changed:
            # Steps per epoch changed: continue the schedules at the same epoch position, as the
            # official code does by replaying epoch * steps_per_epoch scheduler steps.
            position = self.stream.epoch * self.steps_per_epoch
            for schedule in (self.lr_schedule, self.wd_schedule, self.momentum_schedule):
                schedule.load_state_dict({"step": position})
            logger.warning("steps per epoch changed: schedules continue from epoch %d (position %d)",
                           self.stream.epoch, position)

    def init_from(self, source: str, with_optimizer: bool = False) -> None:
        """Take weights (and optionally the optimizer state) from `source`; step, schedules and data
        position stay at zero. Rank 0 fetches first, so a URL is downloaded once into the cache."""
        from ..weights.load import fetch, load_checkpoint
        from ..weights.official import strip_prefixes

        where = f"meta.init_from={source}"

        def fetch_once():
            try:
                return str(fetch(source))
            except FileNotFoundError as exc:
                raise UserError(f"{where}: {exc}") from None

        path = self._on_main_then_broadcast(fetch_once)
        try:
            state = load_checkpoint(path if Path(path).exists() else source)
        except UserError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"{where}: cannot read it ({type(exc).__name__}: {first})") from None
        if not isinstance(state, dict):
            raise UserError(f"{where} holds a {type(state).__name__}, not weights")
        own = (*self.networks, *self.ema_networks)
        same_objective = saved_objective(state.get("config")) == self.cfg.meta.objective
        if same_objective and all(isinstance(state.get(k), dict) for k in own):
            # A run of the same objective: every network by its name.
            nets = {k: strip_prefixes(state[k]) for k in own}
            modules = {**{k: unwrap(m) for k, m in self.networks.items()}, **self.ema_networks}
        else:
            nets = {k: strip_prefixes(state[k]) for k in ("encoder", "target_encoder", "predictor")
                    if isinstance(state.get(k), dict)}
            if not nets and "patch_embed.proj.weight" in strip_prefixes(state):
                nets["encoder"] = strip_prefixes(state)  # a bare encoder state dict (or a Hugging Face model)
            if "encoder" not in nets and "target_encoder" not in nets:
                raise UserError(f"{where} has no encoder weights (keys: {', '.join(map(str, list(state)[:8]))})")
            # One encoder only (e.g. Hugging Face): it starts both the context and the target encoder.
            nets.setdefault("encoder", nets.get("target_encoder"))
            nets.setdefault("target_encoder", nets["encoder"])
            # The encoder's weights start the backbone the EMA teacher follows (the gated student's ViT, ...).
            modules = {"encoder": unwrap(resolve(self.networks, self.objective.ema["target_encoder"])),
                       "target_encoder": self.ema_networks["target_encoder"]}
            if "predictor" in self.networks and "encoder" in self.networks:
                modules["predictor"] = unwrap(self.predictor)
            elif "predictor" in nets:
                del nets["predictor"]  # another objective's predictor does not fit this one
                if self.env.is_main:
                    logger.info("%s: its predictor is not used (meta.objective=%s has its own)", where,
                                self.cfg.meta.objective)
        for name, weights in nets.items():
            _load_exactly(modules[name], weights, f"{where} ({name})", sharded=self.sharded)
        taken = sorted(nets)
        if with_optimizer:
            if not isinstance(state.get("opt"), dict):
                raise UserError(f"{where} has no optimizer state; set meta.init_optimizer=false")
            if not all(k in nets for k in self.networks):
                raise UserError(f"{where} lacks {', '.join(k for k in self.networks if k not in nets)} of meta.objective="
                                f"{self.cfg.meta.objective}, so its optimizer state cannot fit; set "
                                f"meta.init_optimizer=false")
            try:
                if self.sharded:
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                    set_optimizer_state_dict(
                        self._trainable, self.optimizer,
                        optimizer_state_to_fqns(state["opt"], self._param_names_per_group()),
                        options=StateDictOptions(full_state_dict=True))
                else:
                    self.optimizer.load_state_dict(state["opt"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise UserError(f"{where}: its optimizer state does not fit this model ({one_line(exc)}); set "
                                f"meta.init_optimizer=false") from None
            taken.append("optimizer")
        self.lineage = [{"init_from": source}]
        if self.env.is_main:
            missing = ("" if all(k in nets for k in self.networks) else
                       f" ({', '.join(k for k in self.networks if k not in nets)} start(s) from random weights)")
            logger.info("initialised %s from %s%s; step, schedules and data start from zero", ", ".join(taken),
                        source, missing)

    def save(self, periodic: Optional[Path] = None) -> None:
        if self._saved_step == self.step and periodic is None:
            return
        self.metrics.sync()  # rows up to this step survive a machine crash together with the checkpoint
        if self.sharded:
            self._save_dcp(periodic)
            return
        state = self.state_dict()
        error = None
        if self.env.is_main:
            try:
                path = self.checkpoints.save(state, periodic)
                logger.info("saved checkpoint %s (step %d)", path.name, self.step)
            except (OSError, RuntimeError) as exc:
                cause = _os_error_in(exc)
                if cause is None:
                    raise
                error = describe_write_error(cause, periodic or self.checkpoints.latest, self._saved_step)
        # Doubles as the barrier: every rank learns whether the checkpoint was committed.
        error = dist_utils.broadcast_object(error)
        if error is not None:
            raise CheckpointWriteError(error)
        self._saved_step = self.step

    def _tensor_keys(self) -> tuple[str, ...]:
        """The entries of a sharded state dict that DCP writes (the rest goes in the trainer-state file)."""
        return ("model", *self.ema_networks, "opt")

    def _share_error(self, error: Optional[str]) -> None:
        error = dist_utils.broadcast_object(error)
        if error is not None:
            raise CheckpointWriteError(error)

    def _save_dcp(self, periodic: Optional[Path]) -> None:
        """Every rank writes its shards into one DCP folder; rank 0 commits it (marker, latest, retention)."""
        import torch.distributed.checkpoint as dcp

        self.wait_for_checkpoint()
        state = self.state_dict()
        tensors = {k: state.pop(k) for k in self._tensor_keys()}
        path = self.checkpoints.dcp_path(periodic, self.step)
        error = None
        if self.env.is_main:
            try:
                self.checkpoints.begin_dcp(path)
                atomic_save(state, path / TRAINER_STATE)
            except OSError as exc:
                error = describe_write_error(exc, path, self._saved_step)
        self._share_error(error)
        if self._checkpoint_group is not None:
            # Staged copies: training goes on changing the live tensors while the writer thread runs.
            staged = _clone_tensors(tensors)
            future = dcp.async_save(staged, checkpoint_id=str(path), process_group=self._checkpoint_group)
            self._pending_save = (future, path, periodic is not None, self.step)
            self._saved_step = self.step
            return
        try:
            dcp.save(tensors, checkpoint_id=str(path))
        except Exception as exc:
            cause = _os_error_in(exc)
            if cause is None:
                raise
            error = describe_write_error(cause, path, self._saved_step)
        self._share_error(error)
        self._commit_dcp(path, periodic is not None, self.step)
        self._saved_step = self.step

    def _commit_dcp(self, path: Path, periodic: bool, step: int) -> None:
        error = None
        if self.env.is_main:
            try:
                self.checkpoints.commit_dcp(path, periodic)
                logger.info("saved checkpoint %s (step %d)", path.name, step)
            except OSError as exc:
                error = describe_write_error(exc, path, None)
        self._share_error(error)

    def wait_for_checkpoint(self) -> None:
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

    def request_stop(self, signum=None, frame=None) -> None:
        """Ask to stop (a signal handler); all ranks agree on the step in the next all-reduce."""
        self.stop_requested = True
        if signum in STOP_SIGNALS:
            self.requested_signals.add(signum)

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
        position = self.lr_schedule.step_count + 1
        new = (self.lr_schedule, self.wd_schedule, self.momentum_schedule)
        values = [(name, o.value(position), n.value(position)) for name, o, n in zip(("lr", "wd", "momentum"), old, new)]
        if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) for _, a, b in values):
            return
        changed = [f"optimization.{k} {saved[k]} -> {getattr(ours, k)}" for k in sorted(fields)
                   if k in saved and k != "stop_at_step" and _plain(saved[k]) != _plain(getattr(ours, k))]
        logger.warning("resuming with %s: the lr/wd/momentum schedules are recomputed; at step %d %s",
                       ", ".join(changed) or "changed optimization settings", position,
                       ", ".join(f"{name} {a:.4g} -> {b:.4g}" for name, a, b in values if a != b))

    def _put_stop_flags(self, shared: torch.Tensor, at: int) -> None:
        shared[at] = 1.0 if self.stop_requested else 0.0
        for i, sig in enumerate(STOP_SIGNALS):
            shared[at + 1 + i] = 1.0 if sig in self.requested_signals else 0.0

    def _take_stop_flags(self, shared: torch.Tensor, at: int) -> None:
        if shared[at] > 0 and not self.stop_agreed:
            self.stop_agreed = True
            self.agreed_signals = [sig.name for i, sig in enumerate(STOP_SIGNALS) if shared[at + 1 + i] > 0]

    def checkpoint_of_step(self) -> Optional[Path]:
        """The committed checkpoint (file or DCP folder) that holds the current step, if there is one."""
        self.wait_for_checkpoint()
        if self._saved_step == self.step:
            return self.checkpoints.current_latest()
        return None

    def close(self) -> None:
        if self._pending_save is not None:
            self.wait_for_checkpoint()
        self.stream.close()
        self.metrics.close()
        if getattr(self, "tensorboard", None) is not None:
            self.tensorboard.close()
