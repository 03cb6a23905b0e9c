"""The I-JEPA pretraining loop, as small pieces: build, train_step, train, state_dict, close."""

from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import math
import random
import resource
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import distributed as dist_utils
from .checkpoint import CheckpointFiles, load_checkpoint_file
from .config import Config, dump_config
from .data.sources import build_source
from .data.stream import DataStream
from .data.transforms import ImageTransform, normalize
from .errors import RunFailure, UserError
from .evaluation.collapse import CollapseMonitor
from .masks import MultiBlockMaskCollator
from .metrics import CSVMetrics
from .models import build_encoder, build_predictor
from .models.vision_transformer import VIT_SIZES
from .objectives import build_objective
from .parallel import autocast_context, make_grad_scaler, unwrap, wrap_data_parallel
from .procutil import STOP_SIGNALS
from .schedules import build_schedules

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


def official_param_groups(encoder: torch.nn.Module, predictor: torch.nn.Module) -> list[dict]:
    """AdamW groups as official: weight decay on >=2-D non-bias weights only (flag WD_exclude)."""

    def decayed(module):
        return [p for n, p in module.named_parameters() if "bias" not in n and p.ndim != 1]

    def excluded(module):
        return [p for n, p in module.named_parameters() if "bias" in n or p.ndim == 1]

    return [
        {"params": decayed(encoder)},
        {"params": decayed(predictor)},
        {"params": excluded(encoder), "WD_exclude": True, "weight_decay": 0},
        {"params": excluded(predictor), "WD_exclude": True, "weight_decay": 0},
    ]


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
        cause, fix = "no space left on device", "free space (or set logging.keep_last) and run the same command"
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


def max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Trainer:
    def __init__(self, cfg: Config, env: dist_utils.DistEnv, objective=None):
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.dtype = cfg.meta.resolved_dtype
        self.folder = Path(cfg.logging.folder)
        if env.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
        dist_utils.barrier()

        torch.manual_seed(cfg.meta.seed)
        encoder = build_encoder(
            cfg.meta.model_name, img_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size,
            embed_dim=cfg.meta.embed_dim, depth=cfg.meta.depth, num_heads=cfg.meta.num_heads,
        )
        predictor = build_predictor(encoder, pred_depth=cfg.meta.pred_depth, pred_emb_dim=cfg.meta.pred_emb_dim)
        self.target_encoder = copy.deepcopy(encoder).to(self.device)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        self.encoder = wrap_data_parallel(encoder, self.device, env.world_size)
        self.predictor = wrap_data_parallel(predictor, self.device, env.world_size)
        self.optimizer = torch.optim.AdamW(official_param_groups(encoder, predictor))
        self.scaler = make_grad_scaler(self.device, self.dtype)
        self.objective = objective if objective is not None else build_objective(cfg.optimization)
        # Whatever extra metrics the objective returns are logged as CSV columns, in this order.
        self.metric_names = tuple(getattr(self.objective, "metric_names", ()))
        thresholds = {n: getattr(cfg.logging, f"collapse_{n}") for n in self.metric_names
                      if hasattr(cfg.logging, f"collapse_{n}")}
        self.collapse = CollapseMonitor(thresholds, cfg.logging.collapse_patience)

        self.collator = MultiBlockMaskCollator(
            input_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size,
            enc_mask_scale=cfg.mask.enc_mask_scale, pred_mask_scale=cfg.mask.pred_mask_scale,
            aspect_ratio=cfg.mask.aspect_ratio, nenc=cfg.mask.num_enc_masks, npred=cfg.mask.num_pred_masks,
            min_keep=cfg.mask.min_keep, allow_overlap=cfg.mask.allow_overlap,
            legacy_sampler=cfg.mask.legacy_sampler, seed=cfg.meta.seed, rank=env.rank,
        )
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
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.lr_schedule, self.wd_schedule, self.momentum_schedule = build_schedules(
            cfg.optimization, self.steps_per_epoch
        )
        self.checkpoints = CheckpointFiles(self.folder, cfg.logging.write_tag, cfg.logging.keep_last)
        self.eval_sources = None
        if cfg.logging.eval_every_epochs or cfg.logging.eval_every_steps:
            self.eval_sources = self._open_eval_sources_once(cfg.data)

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
            state = load_checkpoint_file(resume_path)
            self.resume_file = resume_path
            self.load_state_dict(state)
            self.lineage = list(state.get("lineage", [])) + [{"file": resume_path.name, "step": state.get("step")}]
            self._saved_step = self.step
            self.complete = self.stream.epoch >= cfg.optimization.epochs
            if env.is_main and not self.complete:
                logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, self.step,
                            self.stream.epoch + 1, self.stream.batch_in_epoch)
                self._warn_if_schedules_changed(state)
        if env.is_main and not self.complete:
            # Written once the run is known to go ahead, so a refused run leaves the old one in place.
            (self.folder / "params-ijepa.yaml").write_text(dump_config(cfg))
        self.metrics = CSVMetrics(self.folder / f"{cfg.logging.write_tag}_r{env.rank}.csv",
                                  resume_step=self.step if resume_path is not None else None,
                                  extra_columns=self.metric_names + (EVAL_COLUMN,))
        if env.is_main:
            logger.info("data: %s; %d steps per epoch of %d x %d images", source.describe(),
                        self.steps_per_epoch, env.world_size, cfg.data.batch_size)

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
        return self._on_main_then_broadcast(lambda: build_source(data_cfg))

    def _open_eval_sources_once(self, data_cfg):
        """The periodic evaluation's (train, val) shard sources, listed on rank 0 like the training data."""
        from .evaluation.evaluate import open_eval_shards

        return self._on_main_then_broadcast(
            lambda: (open_eval_shards(data_cfg.eval_train_shards, "data.eval_train_shards"),
                     open_eval_shards(data_cfg.eval_val_shards, "data.eval_val_shards")))

    # ---------------------------------------------------------------- step
    def _set_optimizer_hyperparameters(self, lr: float, wd: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd

    def _ema_update(self, momentum: float) -> None:
        with torch.no_grad():
            target = list(self.target_encoder.parameters())
            online = list(unwrap(self.encoder).parameters())
            torch._foreach_mul_(target, momentum)
            torch._foreach_add_(target, online, alpha=1.0 - momentum)

    def _grad_norm_and_clip(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.cfg.optimization.clip_grad is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optimization.clip_grad, norm)
        return float(norm)

    def train_step(self, batch: dict) -> dict:
        """One optimisation step on one batch; returns the logged metrics."""
        lr = self.lr_schedule.step()
        wd = self.wd_schedule.step()
        momentum = self.momentum_schedule.step()
        self._set_optimizer_hyperparameters(lr, wd)

        start = time.perf_counter()
        images = normalize(batch["images"].to(self.device, non_blocking=True))
        masks_enc = [m.to(self.device, non_blocking=True) for m in batch["masks_enc"]]
        masks_pred = [m.to(self.device, non_blocking=True) for m in batch["masks_pred"]]
        loss, extra = None, {}
        if batch.get("usable", True):
            with autocast_context(self.device, self.dtype):
                loss = self.objective(self.encoder, self.predictor, self.target_encoder, images, masks_enc,
                                      masks_pred)
            if isinstance(loss, tuple):  # (loss, metrics); a plain loss is accepted too
                loss, extra = loss

        # One collective decides for every rank: the global mean loss, which ranks cannot
        # step (non-finite loss, or no decodable sample), and whether any rank was asked to stop.
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

        grad_norm = float("nan")
        skipped = bool(bad_ranks)
        if not skipped:
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_ms = (time.perf_counter() - start) * 1000.0

        self.step += 1
        global_loss = float(shared[0])
        extra_metrics = {name: float("nan") if skipped else float(shared[metrics_at + i])
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
                    f"(epoch {batch['epoch'] + 1}, itr {batch['batch']}); last on rank(s) {bad_ranks}. "
                    f"Lower optimization.lr, set optimization.clip_grad, or resume from an earlier checkpoint"
                )
            global_loss = float("nan")
        else:
            self.consecutive_nonfinite = 0
            self.epoch_loss_sum += global_loss
            self.epoch_loss_count += 1

        if batch["errors"]:
            self.skipped_samples += len(batch["errors"])
            by_source = defaultdict(list)
            for source, message in batch["errors"]:
                by_source[source].append(message)
            for source, messages in by_source.items():
                logger.warning("rank %d: skipped %d sample(s) from %s: %s", self.env.rank, len(messages), source,
                               messages[0])
        return {
            "epoch": batch["epoch"] + 1,
            "itr": batch["batch"],
            "loss": global_loss,
            "mask-A": int(masks_enc[0].shape[1]),
            "mask-B": int(masks_pred[0].shape[1]),
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
        logger.info(
            "[ep %d, itr %d/%d, step %d] loss %.4f (avg %.4f) | masks %d/%d | lr %.3g wd %.3g m %.5f | "
            "%.0f ms/step %.1f img/s data %.0f ms | mem %.0f MB%s",
            metrics["epoch"], metrics["itr"] + 1, self.steps_per_epoch, metrics["step"], metrics["loss"], avg,
            metrics["mask-A"], metrics["mask-B"], metrics["lr"], metrics["wd"], metrics["momentum"],
            metrics["time (ms)"], metrics["img_per_s"], metrics["data_ms"], metrics["max_mem_mb"],
            self._metrics_text(metrics),
        )

    def _metrics_text(self, metrics: dict) -> str:
        """The objective's metrics (and the k-NN accuracy when evaluated) for the progress line."""
        parts = [f"{name} {metrics[name]:.4g}" for name in self.metric_names]
        if metrics.get(EVAL_COLUMN) is not None:
            parts.append(f"{EVAL_COLUMN} {metrics[EVAL_COLUMN]:.4f}")
        return " | " + " ".join(parts) if parts else ""

    def _eval_due(self, epoch: int, last_in_epoch: bool) -> bool:
        every_epochs, every_steps = self.cfg.logging.eval_every_epochs, self.cfg.logging.eval_every_steps
        if self.eval_sources is None:
            return False
        return bool((every_steps and self.step % every_steps == 0)
                    or (every_epochs and last_in_epoch and epoch % every_epochs == 0))

    def evaluate_knn(self) -> float:
        """k-NN accuracy of the target encoder on the eval shards (every rank must call it).

        Training is left exactly as it was: the RNG states are restored afterwards and the
        training data stream is not touched, so a run with evaluation resumes bit for bit.
        """
        from .evaluation.evaluate import evaluate

        saved = rng_state()
        start = time.perf_counter()
        try:
            result = evaluate(self.target_encoder, *self.eval_sources, ("knn",), crop_size=self.cfg.data.crop_size,
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
        every_steps = self.cfg.logging.checkpoint_every_steps
        global_batch = self.env.world_size * self.cfg.data.batch_size
        while self.stream.epoch < epochs:
            if self._should_stop():
                return self._stop(periodic=None)
            if self.stream.batch_in_epoch == 0:
                self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
            wait_start = time.perf_counter()
            for batch in self.stream.epoch_batches():
                data_ms = (time.perf_counter() - wait_start) * 1000.0
                metrics = self.train_step(batch)
                step_s = time.perf_counter() - wait_start
                metrics.update(data_ms=round(data_ms, 3), img_per_s=round(global_batch / step_s, 3),
                               max_mem_mb=round(max_memory_mb(self.device), 1))
                last_in_epoch = batch["batch"] == self.steps_per_epoch - 1
                knn = self.evaluate_knn() if self._eval_due(metrics["epoch"], last_in_epoch) else None
                metrics[EVAL_COLUMN] = knn if self.env.is_main else None
                self.metrics.log(**metrics)
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
        return True

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
        if not self.env.is_main:
            return False
        stop_at = self.cfg.optimization.stop_at_step
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
        """The full training state; every rank must call it (it gathers per-rank state)."""
        per_rank = dist_utils.all_gather_objects(self._local_state())
        return {
            "encoder": add_module_prefix(unwrap(self.encoder).state_dict()),
            "predictor": add_module_prefix(unwrap(self.predictor).state_dict()),
            "target_encoder": add_module_prefix(self.target_encoder.state_dict()),
            "opt": self.optimizer.state_dict(),
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
            "mask_collator": {**self.collator.state_dict(), "step": self.step},
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
        missing = [k for k in ("encoder", "predictor", "target_encoder", "opt") if k not in state]
        if missing:
            raise UserError(f"{where} lacks {missing}: not a training checkpoint. Resume from another file "
                            f"(meta.load_checkpoint=true meta.read_checkpoint=FILE) or use a new logging.folder")
        check_architecture(state, unwrap(self.encoder), unwrap(self.predictor), where)
        try:
            unwrap(self.encoder).load_state_dict(strip_module_prefix(state["encoder"]))
            unwrap(self.predictor).load_state_dict(strip_module_prefix(state["predictor"]))
            self.target_encoder.load_state_dict(strip_module_prefix(state["target_encoder"]))
            self.optimizer.load_state_dict(state["opt"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"{where} does not fit this model/optimizer ({type(exc).__name__}: {first}); "
                            f"resume with the checkpoint's config or use a new logging.folder") from None
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

    def save(self, periodic: Optional[Path] = None) -> None:
        if self._saved_step == self.step and periodic is None:
            return
        self.metrics.sync()  # rows up to this step survive a machine crash together with the checkpoint
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
        """The committed checkpoint file that holds the current step, if there is one."""
        if self._saved_step == self.step and self.checkpoints.latest.is_file():
            return self.checkpoints.latest
        return None

    def close(self) -> None:
        self.stream.close()
        self.metrics.close()
