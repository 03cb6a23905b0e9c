"""The pretraining loop, objective-agnostic: build, train_step, train, close.

The objective decides the networks, the batches' inputs and the loss; the checkpoint manager
(`checkpoint.manager`) saves and resumes every stateful part. The trainer calls both, never the
other way round.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.manager import CheckpointManager
from ..checkpoint.parts import TrainingParts
from ..config import Config, dump_config
from ..data.sources import build_source
from ..data.stream import DataStream
from ..data.transforms import ImageTransform, normalize
from ..distributed import env as dist_utils
from ..distributed.parallel import (ParallelPlan, autocast_context, ema_update_, grad_norm_and_clip_, is_sharded,
                                    make_grad_scaler, no_grad_sync, parallelize)
from ..errors import RunFailure, UserError
from ..metrics import CSVMetrics
from ..objectives import build_objective, resolve
from ..procutil import STOP_SIGNALS
from ..schedules import build_schedules
from .collapse import CollapseMonitor
from .counters import Counters
from .optim import make_optimizer, set_hyperparameters
from .progress import format_eta, max_memory_mb, slow_notice
from .rng import GlobalRNG, rng_state, set_rng_state
from ..version import run_info, version_line
from .trackers import Trackers

logger = logging.getLogger("ijepa_scale")

EVAL_COLUMN = "knn_acc"


class NonFiniteLossError(RunFailure):
    on_every_rank = True  # decided in the step's all-reduce, so every rank stops at the same step


NONFINITE_GRADIENT = "gradient"  # in place of rank numbers: every rank's update was skipped for the gradient


def straggler_text(waits_ms: list[float], factor: float = 3.0, floor_ms: float = 100.0) -> str:
    """A note when one rank waited for its data far longer than the others (slow, not stuck: it still
    steps); empty otherwise."""
    if len(waits_ms) < 2:
        return ""
    slowest = max(range(len(waits_ms)), key=waits_ms.__getitem__)
    others = sorted(w for r, w in enumerate(waits_ms) if r != slowest)
    typical = others[len(others) // 2]
    if waits_ms[slowest] < floor_ms or waits_ms[slowest] < factor * typical:
        return ""
    return (f"straggler: rank {slowest} waited {waits_ms[slowest]:.0f} ms for its data (the others "
            f"{typical:.0f} ms); every step waits for it (data.num_workers, its storage or its host)")


class Trainer:
    def __init__(self, cfg: Config, env: dist_utils.DistEnv, objective=None, heartbeat=None):
        self.cfg = cfg
        self.env = env
        # Where this rank is (data wait, compute, collective, checkpoint, evaluation), for the hang watchdog.
        self.beat = heartbeat.beat if heartbeat is not None else (lambda phase, step=None: None)
        self.device = env.device
        self.dtype = cfg.distributed.dtype
        self.folder = Path(cfg.logging.folder)
        if env.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            logger.info("%s", version_line())
        dist_utils.barrier()

        # The objective says which networks are trained, which follow by EMA and what a batch carries.
        self.objective = objective if objective is not None else build_objective(cfg)
        self.accum_steps = cfg.distributed.accum_steps
        self._build_networks(cfg)
        # Whatever extra metrics the objective returns are logged as CSV columns, in this order.
        self.metric_names = tuple(getattr(self.objective, "metric_names", ()))
        thresholds = {n: cfg.collapse.thresholds[n] for n in self.metric_names
                      if n in cfg.collapse.thresholds}
        self.counters = Counters(CollapseMonitor(thresholds, cfg.collapse.patience))
        source = self._build_data(cfg)
        # Damaged unindexed shards found while counting are logged once, by rank 0.
        self.counters.skipped_samples = getattr(source, "startup_skipped", 0) if env.is_main else 0

        self.stop_requested = False  # set locally by a signal
        self.requested_signals: set[int] = set()  # the signals behind stop_requested
        self.stop_agreed = False  # set on every rank once any rank asked to stop
        self.agreed_signals: list[str] = []  # names of the signals any rank had when they agreed
        self._at_epoch_end = False  # the step just trained ends an epoch
        self.data_wait_ms = 0.0  # this rank's wait for the current batch
        self.diverged: Optional[NonFiniteLossError] = None  # too many skipped steps in a row
        self.rank_waits_ms: list[float] = []  # every rank's, as of the last step's all-reduce

        parts = TrainingParts(self.networks, self.ema_networks, self.optimizer, self.scaler,
                              dict(zip(("lr", "wd", "momentum"), self.schedules)), self.stream, self.batches,
                              self.counters, GlobalRNG())
        self.checkpoints = CheckpointManager(cfg, parts, self.objective, env, sharded=self.sharded,
                                             steps_per_epoch=self.steps_per_epoch)
        self.resume_file = self.checkpoints.resume()
        self.complete = self.checkpoints.complete
        self._open_logs(source)

    def _build_networks(self, cfg: Config) -> None:
        torch.manual_seed(cfg.meta.seed)
        online = self.objective.networks_from_config(cfg)
        frozen = self.objective.ema_networks(online)
        self.plan = ParallelPlan.from_config(cfg.distributed)
        self.networks = {name: parallelize(module, self.device, self.plan) for name, module in online.items()}
        self.ema_networks = {name: parallelize(module, self.device, self.plan, trainable=False)
                             for name, module in frozen.items()}
        self.sharded = is_sharded(next(iter(self.networks.values())))
        self.optimizer = make_optimizer(*online.values())
        self.scaler = make_grad_scaler(self.device, self.dtype)

    def _build_data(self, cfg: Config):
        """The objective's batch preparation, the data stream, the schedules and the eval shards; returns
        the training source."""
        self.batches = self.objective.batches(cfg, self.env.rank)
        transform = ImageTransform(
            crop_size=cfg.data.crop_size, crop_scale=cfg.data.crop_scale,
            horizontal_flip=cfg.data.use_horizontal_flip, color_distortion=cfg.data.use_color_distortion,
            color_jitter_strength=cfg.data.color_jitter_strength, gaussian_blur=cfg.data.use_gaussian_blur,
        )
        source = self._build_source_once(cfg.data)
        self.stream = DataStream(
            source, transform, self.batches.collator, batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers, rank=self.env.rank, world_size=self.env.world_size,
            seed=cfg.meta.seed, shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error,
            pin_memory=cfg.data.pin_mem and self.device.type == "cuda",
        )
        # Optimizer steps per epoch; an epoch's micro-batches beyond a multiple of accum_steps are not used.
        self.steps_per_epoch = self.stream.steps_per_epoch // self.accum_steps
        if self.steps_per_epoch == 0:
            raise UserError(f"distributed.accum_steps={self.accum_steps} is more than the "
                            f"{self.stream.steps_per_epoch} micro-batches per epoch; lower distributed.accum_steps "
                            f"or data.batch_size")
        self.schedules = build_schedules(cfg.optimization, self.steps_per_epoch)
        self.lr_schedule, self.wd_schedule, self.momentum_schedule = self.schedules
        self.eval_sources = None
        if cfg.evaluation.every_epochs or cfg.evaluation.every_steps:
            self.eval_sources = self._open_eval_sources_once(cfg.evaluation)
        return source

    def _open_logs(self, source) -> None:
        cfg, env, resumed = self.cfg, self.env, self.resume_file is not None
        if env.is_main and not self.complete:
            # Written once the run is known to go ahead, so a refused run leaves the old one in place.
            (self.folder / "params-ijepa.yaml").write_text(dump_config(cfg, run_info()))
        self.metrics = CSVMetrics(self.folder / f"{cfg.logging.write_tag}_r{env.rank}.csv",
                                  resume_step=self.step if resumed else None,
                                  extra_columns=self.metric_names + (EVAL_COLUMN,))
        self.trackers = None
        if env.is_main and not self.complete:
            groups = {column: self.batches.metric_group if column in self.batches.metric_names
                      else "eval" if column == EVAL_COLUMN else "train"
                      for column in self.metrics.columns if column != "step"}
            self.trackers = Trackers.from_config(cfg, self.folder, groups, self.metrics.path,
                                                 self.step if resumed else None)
        if env.is_main:
            logger.info("data: %s; %d steps per epoch of %d x %d images", source.describe(),
                        self.steps_per_epoch, env.world_size, cfg.data.batch_size)

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def eval_encoder(self) -> torch.nn.Module:
        """The network exported and evaluated (the EMA teacher of every objective)."""
        return self.ema_networks[self.objective.encoder_name]

    def _build_source_once(self, data_cfg):
        def build():
            with slow_notice(f"listing the training shards ({data_cfg.shards or data_cfg.root_path})"):
                return build_source(data_cfg)

        return dist_utils.on_main_then_broadcast(self.env.is_main, build)

    def _open_eval_sources_once(self, eval_cfg):
        """The periodic evaluation's (train, val) shard sources, listed on rank 0 like the training data."""
        from ..evaluation.evaluate import open_eval_shards

        return dist_utils.on_main_then_broadcast(
            self.env.is_main,
            lambda: (open_eval_shards(eval_cfg.train_shards, "evaluation.train_shards"),
                     open_eval_shards(eval_cfg.val_shards, "evaluation.val_shards")))

    # ---------------------------------------------------------------- step
    def _ema_update(self, momentum: float) -> None:
        for name, source in self.objective.ema.items():
            ema_update_(self.ema_networks[name].parameters(), resolve(self.networks, source).parameters(), momentum)

    def _grad_norm_and_clip(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return float(grad_norm_and_clip_(params, self.cfg.optimization.clip_grad))

    def _inputs(self, batch: dict, micro_index: int = 0) -> dict:
        """The objective's inputs of one micro-batch, on the device."""
        images = normalize(batch["images"].to(self.device, non_blocking=True))
        return self.batches.inputs(images, batch, draw=self.step * self.accum_steps + micro_index)

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
        waits_at = metrics_at + len(self.metric_names)  # each rank's wait for this batch, to spot stragglers
        shared = torch.zeros(waits_at + world, dtype=torch.float64, device=self.device)
        shared[waits_at + self.env.rank] = self.data_wait_ms
        shared[0] = loss.detach().double() / world if local_ok else 0.0
        shared[1 + self.env.rank] = 0.0 if local_ok else 1.0
        self._put_stop_flags(shared, world + 1)
        if local_ok:
            for i, name in enumerate(self.metric_names):
                shared[metrics_at + i] = torch.as_tensor(extra[name], dtype=torch.float64) / world
        self.beat("collective")
        dist_utils.all_reduce_sum(shared)
        self.beat("compute")
        shared = shared.cpu()
        self.rank_waits_ms = shared[waits_at:].tolist()
        bad_ranks = [r for r in range(world) if shared[1 + r] > 0]
        self._take_stop_flags(shared, world + 1)
        return shared, bad_ranks

    def _accumulate(self, micro: list[dict]) -> tuple[float, list, list, dict]:
        """Forward and backward of every micro-batch: (summed global loss, summed objective metrics, the
        ranks that could not step, the first micro-batch's own metrics)."""
        metrics_at = self.env.world_size + 2 + len(STOP_SIGNALS)
        global_loss, metric_sums = 0.0, [0.0] * len(self.metric_names)
        bad_ranks: list = []
        batch_metrics = None
        trainable = tuple(self.networks.values())
        for i, mb in enumerate(micro):
            loss, extra, inputs = self._forward(mb, i)
            if batch_metrics is None:
                batch_metrics = self.batches.metrics(inputs)
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
        return global_loss, metric_sums, bad_ranks, batch_metrics

    def _update(self, momentum: float, bad_ranks: list) -> tuple[float, list]:
        """The optimizer and EMA step unless a rank could not step: (grad norm, the ranks that could not
        step, or [NONFINITE_GRADIENT] when the gradient is; empty when the update was made)."""
        grad_norm = float("nan")
        if not bad_ranks:
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
                bad_ranks = [NONFINITE_GRADIENT]
        self.optimizer.zero_grad(set_to_none=True)
        if bad_ranks and self.sharded:
            # FSDP keeps the roots' parameters gathered after forward until their backward, which a
            # skipped step never runs; reshard so state dicts and the EMA see the shards again.
            for module in self.networks.values():
                module.reshard()
        return grad_norm, bad_ranks

    def _count_step(self, global_loss: float, bad_ranks: list, batch: dict, n: int) -> float:
        """Advance the step and the loss/skip counters; the loss to log (NaN for a skipped step)."""
        counters = self.counters
        counters.step += 1
        if not bad_ranks:
            counters.consecutive_nonfinite = 0
            counters.epoch_loss_sum += global_loss
            counters.epoch_loss_count += 1
            return global_loss
        counters.skipped_steps += 1
        counters.consecutive_nonfinite += 1
        cause = ("a non-finite gradient norm" if bad_ranks == [NONFINITE_GRADIENT] else
                 f"a non-finite loss or no decodable sample on rank(s) {', '.join(map(str, bad_ranks))}")
        if self.env.is_main:  # every rank decided the same in the step's all-reduce: one line speaks for all
            logger.warning("step %d: %s; update skipped on every rank (%d in a row)", self.step, cause,
                           counters.consecutive_nonfinite)
        if counters.consecutive_nonfinite >= self.cfg.optimization.max_consecutive_nonfinite:
            # Raised once the step's CSV row is written (_train_epoch), so the row and the message agree.
            self.diverged = NonFiniteLossError(
                f"{counters.consecutive_nonfinite} consecutive skipped steps ending at step {self.step} "
                f"(epoch {batch['epoch'] + 1}, itr {batch['batch'] // n}), the last for {cause}. "
                f"Lower optimization.lr, set optimization.clip_grad, or resume from an earlier checkpoint"
            )
        return float("nan")

    def train_step(self, batch: dict | list[dict]) -> dict:
        """One optimisation step on one batch, or on a list of accumulation micro-batches; returns the
        logged metrics."""
        micro = batch if isinstance(batch, list) else [batch]
        batch, n = micro[-1], len(micro)
        lr, wd, momentum = (schedule.step() for schedule in self.schedules)
        set_hyperparameters(self.optimizer, lr, wd)

        start = time.perf_counter()
        global_loss, metric_sums, bad_ranks, batch_metrics = self._accumulate(micro)
        grad_norm, bad_ranks = self._update(momentum, bad_ranks)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_ms = (time.perf_counter() - start) * 1000.0

        loss = self._count_step(global_loss / n if n > 1 else global_loss, bad_ranks, batch, n)
        extra_metrics = {name: float("nan") if bad_ranks else (metric_sums[i] / n if n > 1 else metric_sums[i])
                         for i, name in enumerate(self.metric_names)}
        self.counters.skipped_samples += sum(len(mb["errors"]) for mb in micro)  # the data stream logs why
        return {
            "epoch": batch["epoch"] + 1, "itr": batch["batch"] // n, "loss": loss, **batch_metrics,
            "time (ms)": round(compute_ms, 3), "step": self.step, "lr": lr, "wd": wd, "momentum": momentum,
            "grad_norm": grad_norm, "skipped": self.counters.skipped_samples,
            "skipped_steps": self.counters.skipped_steps, **extra_metrics,
        }

    # ---------------------------------------------------------------- loop
    def _log_progress(self, metrics: dict) -> None:
        logger.info(
            "[ep %d, itr %d/%d, step %d] loss %.4f (avg %.4f)%s | lr %.3g wd %.3g m %.5f | "
            "%.0f ms/step %.1f img/s data %.0f ms | mem %.0f MB | %s%s",
            metrics["epoch"], metrics["itr"] + 1, self.steps_per_epoch, metrics["step"], metrics["loss"],
            self.counters.epoch_loss(), self.batches.describe(metrics), metrics["lr"], metrics["wd"],
            metrics["momentum"], metrics["time (ms)"], metrics["img_per_s"], metrics["data_ms"],
            metrics["max_mem_mb"], self._eta_text(metrics["itr"]), self._metrics_text(metrics),
        )
        straggler = straggler_text(self.rank_waits_ms) if metrics["step"] > 1 else ""  # step 1 includes start-up
        if straggler:
            logger.warning("step %d: %s", metrics["step"], straggler)

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
        self.beat("evaluation")
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
        self._session = {"began": time.perf_counter(), "first_step": self.step, "timed_from": None}
        first_batch = slow_notice("waiting for the first batch (decoding, workers starting)",
                                  self.env.is_main).start()
        while self.stream.epoch < epochs:
            if self._should_stop():
                first_batch.stop()
                return self._stop(periodic=None)
            if self.stream.batch_in_epoch == 0:
                self.counters.epoch_loss_sum, self.counters.epoch_loss_count = 0.0, 0
            if not self._train_epoch(first_batch):
                return self._stop(periodic=self._epoch_end_path() if self._at_epoch_end else None)
            self.save(periodic=self._epoch_end_path())
            if self.env.is_main:
                logger.info("epoch %d done: avg loss %.5f", self.stream.epoch, self.counters.epoch_loss())
        first_batch.stop()
        self.checkpoints.wait()
        self._log_summary("run finished")
        return True

    def _train_epoch(self, first_batch: slow_notice) -> bool:
        """The rest of the current epoch, step by step; False when the ranks agreed to stop."""
        every_steps = self.cfg.checkpoint.every_steps
        wait_start = time.perf_counter()
        micro: list[dict] = []
        self.beat("data wait", step=self.step)
        for batch in self.stream.epoch_batches():
            first_batch.stop()
            self.beat("compute")
            if batch["batch"] >= self.steps_per_epoch * self.accum_steps:
                continue  # the epoch's tail that does not fill an optimizer step
            micro.append(batch)
            if len(micro) < self.accum_steps:
                continue
            data_ms = self.data_wait_ms = (time.perf_counter() - wait_start) * 1000.0
            metrics = self.train_step(micro if self.accum_steps > 1 else batch)
            micro = []
            self._at_epoch_end = batch["batch"] == self.stream.steps_per_epoch - 1
            self._log_step(metrics, data_ms, time.perf_counter() - wait_start)
            if self.diverged is not None:
                raise self.diverged
            if self._should_stop():
                return False
            if every_steps and self.step % every_steps == 0 and not self._at_epoch_end:
                self.save(periodic=self.checkpoints.files.step_path(self.step))
            wait_start = time.perf_counter()
            self.beat("data wait", step=self.step)
        return True

    def _log_step(self, metrics: dict, data_ms: float, step_s: float) -> None:
        """Throughput and memory, the periodic k-NN, the CSV row and the trackers, the progress line and the
        collapse monitor, for the step just trained."""
        global_batch = self.env.world_size * self.cfg.data.batch_size
        metrics.update(data_ms=round(data_ms, 3), img_per_s=round(global_batch / step_s, 3),
                       max_mem_mb=round(max_memory_mb(self.device), 1))
        knn = self.evaluate_knn() if self._eval_due(metrics["epoch"], self._at_epoch_end) else None
        metrics[EVAL_COLUMN] = knn if self.env.is_main else None
        # Fixed columns this objective does not report are written empty.
        row = {column: metrics.get(column) for column in self.metrics.columns}
        self.metrics.log(**row)
        if self.trackers is not None:
            self.trackers.log(row)
        if self._session["timed_from"] is None:  # the first step includes start-up: ETA from the next
            self._session["timed_from"] = (time.perf_counter(), self.step)
        progress_line = self.step % self.cfg.logging.log_freq == 0 or self.step == 1
        if self.env.is_main and (progress_line or knn is not None or not math.isfinite(metrics["loss"])):
            self._log_progress(metrics)
        if self.env.is_main and progress_line:
            self.counters.collapse.update(metrics, self.step)

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
        checkpoint = self.checkpoints.checkpoint_of_step()
        if self.stream.batch_in_epoch:  # stopped inside an epoch: the epoch the progress lines named
            where, average = f"in epoch {self.stream.epoch + 1}", f"epoch {self.stream.epoch + 1}'s average loss so far"
        else:
            where, average = f"after epoch {self.stream.epoch}", f"epoch {self.stream.epoch}'s average loss"
        logger.info("%s: %d steps in this session (step %d of %d, %s), %s, %.1f img/s; %s %.5f; checkpoint %s; "
                    "report: ijepa-scale report %s", how, steps, self.step,
                    self.cfg.optimization.epochs * self.steps_per_epoch, where,
                    format_eta(seconds) if seconds >= 60 else f"{seconds:.1f}s",
                    images / max(seconds, 1e-9), average, self.counters.epoch_loss(), checkpoint or "none",
                    self.folder)

    def _epoch_end_path(self) -> Optional[Path]:
        """The -ep{N} file for the epoch that ends with the current step, if it is kept."""
        epochs_done = self.stream.state_dict()["epoch"]
        keep = epochs_done % self.cfg.logging.checkpoint_freq == 0 or epochs_done == self.cfg.optimization.epochs
        return self.checkpoints.files.epoch_path(epochs_done) if keep else None

    # ---------------------------------------------------------------- stop protocol
    def request_stop(self, signum=None, frame=None) -> None:
        """Ask to stop (a signal handler); all ranks agree on the step in the next all-reduce."""
        self.stop_requested = True
        if signum in STOP_SIGNALS:
            self.requested_signals.add(signum)

    def _put_stop_flags(self, shared: torch.Tensor, at: int) -> None:
        shared[at] = 1.0 if self.stop_requested else 0.0
        for i, sig in enumerate(STOP_SIGNALS):
            shared[at + 1 + i] = 1.0 if sig in self.requested_signals else 0.0

    def _take_stop_flags(self, shared: torch.Tensor, at: int) -> None:
        if shared[at] > 0 and not self.stop_agreed:
            self.stop_agreed = True
            self.agreed_signals = [sig.name for i, sig in enumerate(STOP_SIGNALS) if shared[at + 1 + i] > 0]

    def _should_stop(self) -> bool:
        stop_at = self.cfg.optimization.stop_at_step
        return self.stop_agreed or bool(stop_at and self.step >= stop_at)

    def _stop(self, periodic: Optional[Path]) -> bool:
        trained = self.checkpoints.saved_step != self.step
        self.save(periodic=periodic)
        self.checkpoints.wait()
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
    def save(self, periodic: Optional[Path] = None) -> None:
        """Checkpoint this step (every rank must call it); nothing when `latest` already holds it."""
        if self.checkpoints.needs_save(periodic):
            self.beat("checkpoint", step=self.step)
            self.metrics.sync()  # rows up to this step survive a machine crash together with the checkpoint
            self.checkpoints.save(periodic)
            self.beat("compute")

    def state_dict(self) -> dict:
        """The full training state (every rank must call it); see CheckpointManager.state_dict."""
        return self.checkpoints.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.checkpoints.load_state_dict(state)

    def checkpoint_of_step(self) -> Optional[Path]:
        """The committed checkpoint that holds the current step, if there is one (every rank must call it)."""
        return self.checkpoints.checkpoint_of_step()

    def close(self) -> None:
        self.checkpoints.wait()
        self.stream.close()
        self.metrics.close()
        if getattr(self, "trackers", None) is not None:
            self.trackers.close()
