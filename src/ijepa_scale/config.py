"""Typed configuration tree for a pretraining run.

The YAML schema is the official I-JEPA one (sections data, logging, mask, meta, optimization), whose
files load unchanged.  ijepa-scale adds the sections distributed, checkpoint, evaluation and collapse,
the objective and backbone sections pkt, gated, saccade and energy, and optional keys; every default
keeps the official behaviour.  A config is validated when it is loaded: an unknown key, a wrong type or
an out-of-range value raises :class:`ConfigError` with one line naming the file (or the override), the
key and (for unknown keys) the closest valid key.  A key that moved to another section (``RENAMED``)
still loads, with a one-line deprecation warning naming its new place.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError, UserError  # noqa: F401 (ConfigError is re-exported)
from .objectives.gated import GatedConfig
from .objectives.pkt import LOSS_ALIASES, PKTConfig
from .objectives.saccade import SaccadeConfig
from .models.energy_transformer import MODEL_NAME as ENERGY_MODEL_NAME, EnergyConfig
from .objectives import build_objective

PLACEHOLDER_PREFIX = "$replace_this"
RUN_INFO_KEY = "ijepa_scale"  # a params yaml's record of the code that wrote it; ignored when loaded
OBJECTIVES = ("ijepa", "pkt", "gated", "saccade")
# Sections read only by the objective of the same name; setting one for another objective is probably a mistake.
OBJECTIVE_SECTIONS = ("pkt", "gated", "saccade")


@dataclass
class DataConfig:
    SECTION = "data"

    batch_size: int = 128
    """Per-rank (per-GPU) batch size, as in the official code."""
    color_jitter_strength: float = 0.0
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_size: int = 224
    image_folder: str = "imagenet_full_size/061417/"
    """ImageFolder sub-directory under root_path (used when `shards` is not set)."""
    num_workers: int = 10
    pin_mem: bool = True
    root_path: str = ""
    use_color_distortion: bool = False
    use_gaussian_blur: bool = False
    use_horizontal_flip: bool = False
    shards: Optional[str] = None
    """Webdataset URL or brace pattern of tar shards (local path or fsspec URL); replaces root_path/image_folder."""
    shards_index: Optional[str] = None
    """Index JSON written by make_shards; default: `{prefix}-index.json` or `index.json` beside the shards."""
    shuffle_buffer: int = 1000
    """Samples shuffled together inside a worker's stream (shards are also shuffled per epoch)."""
    on_error: str = "skip"
    """What a corrupt sample or truncated shard does: `skip` (skipped and counted) or `fail`."""
    read_timeout_s: float = 60.0
    """A remote read (open or next block) that returns no data for this long is retried."""
    read_attempts: int = 5
    """Tries per shard on transient errors (reset connection, 5xx, timeout) before it is skipped (or fails)."""
    retry_backoff_s: float = 1.0
    """Wait before the first retry; doubled after each further failure (capped at 60 s)."""

    def validate(self) -> None:
        _positive(self, "batch_size", "crop_size", "shuffle_buffer", "read_timeout_s", "read_attempts")
        _non_negative(self, "num_workers", "color_jitter_strength", "retry_backoff_s")
        _range_pair(self, "crop_scale", high=1.0)
        _choice(self, "on_error", ("skip", "fail"))


def _require_package(module: str, key: str, install: str) -> None:
    """A one-line error at load when `key` is on but `module` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}=true needs the {module} package: pip install {install}, or set {key}=false")


@dataclass
class WandbConfig:
    SECTION = "logging.wandb"

    enabled: bool = False
    """Rank 0 logs the CSV's metrics and the resolved config to a Weights & Biases run."""
    project: Optional[str] = None
    """W&B project (null: WANDB_PROJECT, else W&B's default)."""
    entity: Optional[str] = None
    """W&B user or team (null: WANDB_ENTITY, else the account's default)."""
    run_name: Optional[str] = None
    """Display name of the run (null: the name of logging.folder)."""
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None
    """online or offline (null: WANDB_MODE, else online); offline runs are written under dir for `wandb sync`."""
    dir: Optional[str] = None
    """Where W&B keeps its files (its `wandb/` folder); null: logging.folder."""

    def validate(self) -> None:
        if self.mode is not None:
            _choice(self, "mode", ("online", "offline"))
        for tag in self.tags:
            if not tag or len(tag) > 64:
                raise ConfigError(f"logging.wandb.tags: {tag!r} must be 1 to 64 characters (a W&B limit)")
        if self.enabled:
            _require_package("wandb", "logging.wandb.enabled", "wandb (or pip install -e '.[wandb]')")


# Stores of MLflow's SQL backend: they need SQLAlchemy, which the full mlflow package brings and mlflow-skinny not.
MLFLOW_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


@dataclass
class MlflowConfig:
    SECTION = "logging.mlflow"

    enabled: bool = False
    """Rank 0 logs the CSV's metrics and the resolved config (as params) to an MLflow run."""
    tracking_uri: Optional[str] = None
    """Tracking server (http://host:5000), database or folder; null: MLFLOW_TRACKING_URI, else the file store
    {logging.folder}/mlruns."""
    experiment: str = "ijepa-scale"
    """Experiment name (created if missing)."""
    run_name: Optional[str] = None
    """Run name (null: the name of logging.folder)."""
    tags: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("logging.mlflow.experiment must not be empty")
        if self.enabled:
            _require_package("mlflow", "logging.mlflow.enabled", "mlflow-skinny (or pip install -e '.[mlflow]')")
            uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
            scheme = uri.partition(":")[0].partition("+")[0]
            if scheme in MLFLOW_DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
                raise ConfigError(f"logging.mlflow.tracking_uri={uri} is a database store, which needs the full "
                                  f"mlflow package: pip install mlflow (mlflow-skinny has no database store)")


@dataclass
class LoggingConfig:
    SECTION = "logging"

    folder: str = "logs/run"
    """Output folder for CSVs, checkpoints and params-ijepa.yaml (created if missing)."""
    write_tag: str = "jepa"
    log_freq: int = 10
    """Rank 0 prints a progress line every log_freq steps."""
    checkpoint_freq: int = 50
    """Keep a `{tag}-ep{N}.pth.tar` every checkpoint_freq epochs (latest is written every epoch)."""
    tensorboard: bool = False
    """Rank 0 also writes TensorBoard event files to {folder}/tensorboard (needs `pip install tensorboard`)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def validate(self) -> None:
        _positive(self, "log_freq", "checkpoint_freq")
        if not self.write_tag or "/" in self.write_tag:
            raise ConfigError(f"logging.write_tag={self.write_tag!r} must be a non-empty file-name prefix")
        if self.tensorboard:
            _require_package("tensorboard", "logging.tensorboard", "tensorboard (or pip install -e '.[tensorboard]')")
        self.wandb.validate()
        self.mlflow.validate()


@dataclass
class MaskConfig:
    SECTION = "mask"

    allow_overlap: bool = False
    aspect_ratio: tuple[float, float] = (0.3, 3.0)
    enc_mask_scale: tuple[float, float] = (0.2, 0.8)
    min_keep: int = 4
    num_enc_masks: int = 1
    num_pred_masks: int = 2
    patch_size: int = 16
    pred_mask_scale: tuple[float, float] = (0.2, 0.8)
    legacy_sampler: bool = False
    """Reproduce the official sampler's bounds and raster-order truncation."""

    def validate(self) -> None:
        _positive(self, "num_enc_masks", "num_pred_masks", "patch_size")
        _non_negative(self, "min_keep")
        _range_pair(self, "enc_mask_scale", high=1.0)
        _range_pair(self, "pred_mask_scale", high=1.0)
        _range_pair(self, "aspect_ratio", high=None)


@dataclass
class MetaConfig:
    SECTION = "meta"

    copy_data: bool = False
    load_checkpoint: bool = False
    """Require a resume from read_checkpoint (or latest); a run also resumes whenever latest exists."""
    model_name: str = "vit_base"
    pred_depth: int = 6
    pred_emb_dim: int = 384
    read_checkpoint: Optional[str] = None
    use_bfloat16: bool = False
    """Autocast in bfloat16 (the default of distributed.dtype)."""
    seed: int = 0
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    init_from: Optional[str] = None
    """Start a new run from these weights (registry name, path, URL, Hugging Face dir): encoder, target
    encoder and predictor where present; schedules and data position start from zero."""
    init_optimizer: bool = False
    """With init_from: also take the optimizer state (AdamW moments) from it."""
    objective: str = "ijepa"
    """What is trained: ijepa, pkt (Probabilistic I-JEPA), gated (Gated I-JEPA) or saccade (Saccade JEPA);
    each objective's settings are in the section of its name."""

    def validate(self) -> None:
        from .models.vision_transformer import VIT_SIZES

        if self.init_optimizer and not self.init_from:
            raise ConfigError("meta.init_optimizer=true needs meta.init_from (the checkpoint to take it from)")

        if self.model_name not in VIT_SIZES and self.model_name != ENERGY_MODEL_NAME:
            raise ConfigError(
                f"meta.model_name={self.model_name!r} is not a model; use a ViT size ({', '.join(VIT_SIZES)}) "
                f"or {ENERGY_MODEL_NAME}"
            )
        _positive(self, "pred_depth", "pred_emb_dim")
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(self, name) is not None:
                _positive(self, name)
        _choice(self, "objective", OBJECTIVES)
        if self.copy_data:
            raise ConfigError(
                "meta.copy_data=true copies a tarball to the official cluster's scratch disk and is not "
                "supported; stream tar shards with data.shards instead"
            )


@dataclass
class OptimizationConfig:
    SECTION = "optimization"

    ema: tuple[float, float] = (0.996, 1.0)
    epochs: int = 100
    final_lr: float = 0.0
    final_weight_decay: float = 0.4
    ipe_scale: float = 1.0
    lr: float = 0.001
    start_lr: float = 0.0002
    warmup: float = 40
    """Warmup length in epochs."""
    weight_decay: float = 0.04
    loss: str = "smooth_l1"
    """smooth_l1 (official code) or l2 (as in the paper)."""
    loss_function: Optional[str] = None
    """The Probabilistic I-JEPA's name for its loss, accepted as an alias: L2_PKT or L2_PKT_chunks select
    meta.objective=pkt with that grouping; L2 is plain I-JEPA."""
    variance_weight: float = 0.0
    """Weight of a VICReg variance term on the context encoder's pooled, layer-normed output (0 = off, official)."""
    covariance_weight: float = 0.0
    """Weight of the matching VICReg covariance term (0 = off, official)."""
    variance_target: float = 1.0
    """Std per feature below which the variance term penalises (VICReg's gamma)."""
    clip_grad: Optional[float] = None
    """Clip the global gradient norm to this value (None = no clipping)."""
    max_consecutive_nonfinite: int = 10
    """Stop the run after this many consecutive steps skipped for a non-finite loss or gradient."""
    stop_at_step: int = 0
    """Save and stop once the global step reaches this value (0 = train all epochs); schedules are unchanged."""

    def validate(self) -> None:
        _positive(self, "epochs", "ipe_scale", "max_consecutive_nonfinite")
        _non_negative(self, "stop_at_step")
        _non_negative(self, "final_lr", "lr", "start_lr", "warmup", "weight_decay", "final_weight_decay")
        _non_negative(self, "variance_weight", "covariance_weight")
        _positive(self, "variance_target")
        _range_pair(self, "ema", high=1.0, allow_zero=True)
        _choice(self, "loss", ("smooth_l1", "l2"))
        if self.loss_function is not None:
            _choice(self, "loss_function", ("L2",) + tuple(LOSS_ALIASES))
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"optimization.clip_grad={self.clip_grad} must be > 0 (or null to disable)")


@dataclass
class DistributedConfig:
    SECTION = "distributed"

    parallel: str = "ddp"
    """ddp (replicate) or fsdp (FSDP2: shard every transformer block and the optimizer state over all ranks)."""
    dtype: Optional[str] = None
    """Autocast dtype: bfloat16, float16 or float32; unset, it is set at load from meta.use_bfloat16
    (bfloat16 if true, else float32)."""
    target_dtype: Optional[str] = None
    """Autocast dtype of the EMA networks' forward (I-JEPA's target encoder, the teacher of every objective),
    which computes the regression targets; unset, distributed.dtype. float32 beside a bfloat16 step keeps the
    targets in full precision for the cost of one forward pass in float32."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (less memory, about 1/3 more compute)."""
    compile: bool = False
    """torch.compile each transformer block (dynamic sequence lengths; the first steps pay the compile)."""
    accum_steps: int = 1
    """Gradient accumulation: micro-batches of data.batch_size per optimizer step (steps, schedules, EMA and
    logs count optimizer steps; an epoch's micro-batches beyond a multiple of accum_steps are not used)."""
    hang_timeout_s: float = 600.0
    """When no rank completes a step for this long, the run ends: every live rank logs the stacks of its threads,
    one line names the rank(s) that stopped making progress, and the run exits 75 to be resumed (SLURM requeues
    it). 0 turns the watchdog off."""
    startup_timeout_s: float = 1800.0
    """The allowance in place of hang_timeout_s until a process completes its first step, and during its first
    checkpoint (start-up, compiling, listing shards, the first save)."""
    collective_timeout_s: float = 1800.0
    """torch.distributed timeout of every process group: a collective that waits longer fails."""

    def validate(self) -> None:
        _choice(self, "parallel", ("ddp", "fsdp"))
        _non_negative(self, "hang_timeout_s", "startup_timeout_s")
        _positive(self, "collective_timeout_s")
        if self.dtype is not None:
            _choice(self, "dtype", ("bfloat16", "float16", "float32"))
        if self.target_dtype is not None:
            _choice(self, "target_dtype", ("bfloat16", "float16", "float32"))
        _positive(self, "accum_steps")
        if self.parallel == "fsdp" and self.dtype == "float16":
            raise ConfigError("distributed.parallel=fsdp does not support distributed.dtype=float16 (its GradScaler "
                              "needs unsharded gradients); use distributed.dtype=bfloat16")
        if self.parallel == "fsdp" and self.target_dtype == "float16":
            raise ConfigError("distributed.parallel=fsdp does not support distributed.target_dtype=float16; use "
                              "bfloat16 or float32")


@dataclass
class CheckpointConfig:
    SECTION = "checkpoint"

    every_steps: int = 0
    """Also checkpoint every N global steps (0 = at epoch end only); logging.checkpoint_freq keeps `-ep` files."""
    keep_last: int = 0
    """Keep only the newest N `-ep`/`-step` checkpoints (0 = keep all); `latest` is always kept."""
    async_save: bool = False
    """distributed.parallel=fsdp only: write checkpoint shards in the background (the next save waits for it)."""

    def validate(self) -> None:
        _non_negative(self, "every_steps", "keep_last")


@dataclass
class EvaluationConfig:
    SECTION = "evaluation"

    every_epochs: int = 0
    """k-NN accuracy of the target encoder every N epochs (needs train_shards and val_shards; 0 = off)."""
    every_steps: int = 0
    """Also evaluate every N global steps (0 = off)."""
    train_shards: Optional[str] = None
    """Labelled tar shards whose features form the k-NN bank."""
    val_shards: Optional[str] = None
    """Labelled tar shards scored by the k-NN evaluation."""

    def validate(self) -> None:
        _non_negative(self, "every_epochs", "every_steps")
        if self.every_epochs or self.every_steps:
            for key in ("train_shards", "val_shards"):
                if not getattr(self, key):
                    raise ConfigError(
                        f"evaluation.every_epochs/every_steps need evaluation.{key}: set it to labelled tar shards "
                        f"(e.g. from `ijepa-scale fashion-mnist --split test`) or set both every_* to 0"
                    )


# Thresholds of the metrics every objective (and gated) logs; any other logged metric can be given one.
COLLAPSE_DEFAULTS = {"pred_norm": 0.1, "target_std": 0.01, "eff_rank": 2.0, "open_frac": 0.02}


@dataclass
class CollapseConfig:
    SECTION = "collapse"

    patience: int = 5
    """Consecutive progress lines below a threshold before the collapse warning."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Logged metric name -> warn when it stays below this (0 = never). Metrics not named take
    COLLAPSE_DEFAULTS: pred_norm (predictions' mean L2 norm) 0.1, target_std (std across the batch of the
    layer-normed targets) 0.01, eff_rank (effective rank of the pooled targets) 2.0 and, for meta.objective=gated,
    open_frac (mean open fraction of the gates) 0.02. At load it becomes the thresholds of this objective's metrics."""

    def validate(self) -> None:
        _positive(self, "patience")
        for name, value in self.thresholds.items():
            if value < 0:
                raise ConfigError(f"collapse.thresholds.{name}={value} must be >= 0")

    def resolve(self, metric_names: tuple[str, ...], objective: str) -> None:
        """Keep the thresholds of the metrics `objective` logs, defaults filled in; another name is an error."""
        for name in self.thresholds:
            if name not in metric_names:
                raise ConfigError(f"collapse.thresholds.{name}: meta.objective={objective} logs no metric '{name}' "
                                  f"(did you mean '{_closest(name, metric_names)}'?); it logs "
                                  f"{', '.join(metric_names)}")
        self.thresholds = {name: self.thresholds.get(name, COLLAPSE_DEFAULTS.get(name)) for name in metric_names
                           if name in self.thresholds or name in COLLAPSE_DEFAULTS}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    pkt: PKTConfig = field(default_factory=PKTConfig)
    gated: GatedConfig = field(default_factory=GatedConfig)
    saccade: SaccadeConfig = field(default_factory=SaccadeConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)

    def validate(self) -> None:
        if self.distributed.dtype is None:
            self.distributed.dtype = "bfloat16" if self.meta.use_bfloat16 else "float32"
        for section in SECTIONS:
            getattr(self, section).validate()
        self._apply_loss_function_alias()
        if self.meta.model_name == ENERGY_MODEL_NAME:
            self.energy.validate_with(self.meta, self.distributed)
            if self.meta.objective not in ("ijepa", "pkt"):
                raise ConfigError(f"meta.model_name={ENERGY_MODEL_NAME} is a backbone of the I-JEPA objectives "
                                  f"(ijepa, pkt); meta.objective={self.meta.objective} needs a ViT: set "
                                  f"meta.model_name to a ViT size")
        if self.data.crop_size % self.mask.patch_size != 0:
            raise ConfigError(
                f"data.crop_size={self.data.crop_size} is not a multiple of mask.patch_size={self.mask.patch_size}"
            )
        for key, value in (("data.root_path", self.data.root_path), ("logging.folder", self.logging.folder)):
            if value.startswith(PLACEHOLDER_PREFIX) and not (key == "data.root_path" and self.data.shards):
                raise ConfigError(
                    f"{key} is still the official placeholder {value!r}: set it in the YAML or override it "
                    f"on the command line ({key}=/your/path)"
                )
        if not self.data.shards and not self.data.root_path:
            raise ConfigError("no training data: set data.shards (tar shards) or data.root_path (ImageFolder root)")
        self.collapse.resolve(tuple(build_objective(self).metric_names), self.meta.objective)

    def _apply_loss_function_alias(self) -> None:
        name = self.optimization.loss_function
        if name is None:
            return
        wanted = "ijepa" if name == "L2" else "pkt"
        if self.meta.objective not in (wanted, "ijepa"):
            raise ConfigError(f"optimization.loss_function={name} is a loss of meta.objective={wanted}, but "
                              f"meta.objective={self.meta.objective}; remove one of them")
        self.meta.objective = wanted
        if name in LOSS_ALIASES:
            alias = LOSS_ALIASES[name]
            if self.pkt.grouping != PKTConfig.grouping and self.pkt.grouping != alias["grouping"]:
                raise ConfigError(f"optimization.loss_function={name} means pkt.grouping={alias['grouping']}, but "
                                  f"pkt.grouping={self.pkt.grouping}; remove one of them")
            self.pkt.grouping = alias["grouping"]
            self.pkt.divide_by_chunks = alias["divide_by_chunks"]

    def section_in_use(self, section: str) -> bool:
        """False for the sections of an objective or model this run does not use."""
        if section in OBJECTIVE_SECTIONS:
            return section == self.meta.objective
        if section == "energy":
            return self.meta.model_name == ENERGY_MODEL_NAME
        return True

    def unused_sections(self, raw_sections) -> list[str]:
        """Sections present in the YAML that this run does not read."""
        return [s for s in raw_sections if s in SECTIONS and not self.section_in_use(s)]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for section in SECTIONS:
            if not self.section_in_use(section):
                continue  # another objective's or model's settings: not part of this run
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _key(obj, name: str) -> str:
    return f"{obj.SECTION}.{name}"


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{_key(obj, name)}={value} must be > 0")


def _non_negative(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ConfigError(f"{_key(obj, name)}={value} must be >= 0")


def _range_pair(obj, name, high, allow_zero=False):
    lo, hi = getattr(obj, name)
    low_ok = lo >= 0 if allow_zero else lo > 0
    if not low_ok or lo > hi or (high is not None and hi > high):
        lower = "0 <=" if allow_zero else "0 <"
        upper = f" <= {high}" if high is not None else ""
        raise ConfigError(f"{_key(obj, name)}=[{lo}, {hi}] must satisfy {lower} low <= high{upper}")


def _choice(obj, name, choices):
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{_key(obj, name)}={value!r} must be one of {', '.join(choices)}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        return _coerce_mapping(value, tp, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {_type_name(args[0])}, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of name: {_type_name(args[1])}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `1e-6` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise AssertionError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce_mapping(value: Any, tp: Any, key: str) -> Any:
    """A sub-section (e.g. logging.wandb) from its mapping; null keeps every default."""
    if value is None:
        return tp()
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    types_ = _section_types(tp)
    unknown = [k for k in value if k not in types_]
    if unknown:
        raise ConfigError(f"{key}: unknown key '{unknown[0]}' (did you mean '{_closest(str(unknown[0]), types_)}'?)")
    return tp(**{k: _coerce(v, types_[k], f"{key}.{k}") for k, v in value.items()})


def _section_types(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


SECTION_CLASSES = typing.get_type_hints(Config)

# Keys of ours that moved out of the official sections: (old section, old key) -> new path. The old spelling
# still loads (YAML, dicts, overrides) with a deprecation warning; setting both spellings is an error.
RENAMED = {
    ("meta", "parallel"): ("distributed", "parallel"),
    ("meta", "dtype"): ("distributed", "dtype"),
    ("meta", "activation_checkpointing"): ("distributed", "activation_checkpointing"),
    ("meta", "compile"): ("distributed", "compile"),
    ("optimization", "accum_steps"): ("distributed", "accum_steps"),
    ("logging", "checkpoint_every_steps"): ("checkpoint", "every_steps"),
    ("logging", "keep_last"): ("checkpoint", "keep_last"),
    ("logging", "async_checkpoint"): ("checkpoint", "async_save"),
    ("logging", "eval_every_epochs"): ("evaluation", "every_epochs"),
    ("logging", "eval_every_steps"): ("evaluation", "every_steps"),
    ("data", "eval_train_shards"): ("evaluation", "train_shards"),
    ("data", "eval_val_shards"): ("evaluation", "val_shards"),
    ("logging", "collapse_patience"): ("collapse", "patience"),
    **{("logging", f"collapse_{name}"): ("collapse", "thresholds", name) for name in COLLAPSE_DEFAULTS},
}

logger = logging.getLogger("ijepa_scale")


def _dotted(path) -> str:
    return ".".join(path)


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.0)
    return match[0] if match else ""


def _suggest(section: str, name: str) -> str:
    """The valid key closest to `name` in `section`: a key of the section, or the new place of a moved key."""
    moved = {old: _dotted(new) for (where, old), new in RENAMED.items() if where == section}
    best = _closest(name, list(_section_types(SECTION_CLASSES[section])) + list(moved))
    return moved.get(best, f"{section}.{best}")


def _holder(raw: dict, path: tuple, where: str) -> dict:
    """The mapping of `raw` that holds `path[-1]`, copied (not the caller's) and created on the way."""
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is not None and not isinstance(child, dict):
            raise ConfigError(f"{where}: {_dotted(path[:depth + 1])} must be a mapping, got {type(child).__name__}")
        node[part] = dict(child or {})
        node = node[part]
    return node


def _move_renamed(raw: dict, where: str) -> dict:
    """A copy of `raw` with every moved key at its new place, one deprecation warning per key."""
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for old, new in RENAMED.items():
        if not isinstance(raw.get(old[0]), dict) or old[1] not in raw[old[0]]:
            continue
        value = raw[old[0]].pop(old[1])
        holder = _holder(raw, new, where)
        if new[-1] in holder:
            raise ConfigError(f"{where}: both {_dotted(old)} and {_dotted(new)} are set; {_dotted(old)} is the old "
                              f"name of {_dotted(new)}: remove it")
        holder[new[-1]] = value
        logger.warning("%s: %s is deprecated, use %s", where, _dotted(old), _dotted(new))
    return raw


def _build_section(section: str, values: Any, where: str):
    section_cls = SECTION_CLASSES[section]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section '{section}' must be a mapping, got {type(values).__name__}")
    types_ = _section_types(section_cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"{where}: unknown key '{section}.{key}' (did you mean '{_suggest(section, str(key))}'?)")
        kwargs[key] = _coerce(value, types_[key], f"{where}: {section}.{key}")
    try:
        return section_cls(**kwargs)
    except UserError as exc:  # sections that check their values when built
        raise ConfigError(f"{where}: {exc}") from None


def _check_sections(raw: Any, where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections ({', '.join(SECTIONS)})")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(
                f"{where}: unknown section '{section}' (did you mean '{_closest(str(section), SECTIONS)}'?)"
            )


def without_run_info(raw: Any) -> Any:
    """A raw config without the `ijepa_scale` entry (the version that wrote a params yaml; not a setting)."""
    if isinstance(raw, dict) and RUN_INFO_KEY in raw:
        return {key: value for key, value in raw.items() if key != RUN_INFO_KEY}
    return raw


def config_from_dict(raw: Any, where: str = "<config>") -> Config:
    raw = without_run_info(raw)
    _check_sections(raw, where)
    raw = _move_renamed(raw, where)
    cfg = Config(**{s: _build_section(s, raw.get(s), where) for s in SECTIONS})
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    unused = cfg.unused_sections(raw)
    if unused:
        logger.warning("%s: section(s) %s are not read by meta.objective=%s, meta.model_name=%s", where,
                       ", ".join(unused), cfg.meta.objective, cfg.meta.model_name)
    return cfg


def _override_path(item: str, parts: list[str]) -> tuple[tuple, Any, bool]:
    """(the key's path, its type, whether it is a moved key's old name) for the override `item`."""
    section, name = parts[0], parts[1]
    if section not in SECTIONS:
        raise ConfigError(f"override {item}: unknown section '{section}'; did you mean "
                          f"'{_closest(section, SECTIONS)}'?")
    if (section, name) in RENAMED and len(parts) == 2:
        path = RENAMED[section, name]
        logger.warning("override %s: %s is deprecated, use %s", item, _dotted(parts), _dotted(path))
        renamed = True
    else:
        path, renamed = tuple(parts), False
    tp = _section_types(SECTION_CLASSES[path[0]]).get(path[1])
    if tp is None:
        raise ConfigError(f"override {item}: unknown key '{name}' in {section}; did you mean "
                          f"'{_suggest(section, name).removeprefix(section + '.')}'?")
    for depth in range(2, len(path)):  # into a mapping (collapse.thresholds) or a sub-section (logging.wandb)
        if typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif dataclasses.is_dataclass(tp):
            inner = _section_types(tp)
            if path[depth] not in inner:
                raise ConfigError(f"override {item}: unknown key '{path[depth]}' in {_dotted(path[:depth])}; did you "
                                  f"mean '{_closest(path[depth], inner)}'?")
            tp = inner[path[depth]]
        else:
            where = _dotted(path[:depth])
            raise ConfigError(f"override {item}: {where} is not a mapping; use {where}=value")
    return path, tp, renamed


def _refuse_shell_expanded(overrides: list[str]) -> None:
    """An unquoted `key=x-{000..003}.tar` reaches us as consecutive `key=x-000.tar ... key=x-003.tar` (the shell
    expanded the braces): the last one would silently win, so say what happened instead."""
    i = 0
    while i < len(overrides):
        key = overrides[i].partition("=")[0]
        j = i
        while j + 1 < len(overrides) and overrides[j + 1].partition("=")[0] == key and "=" in overrides[j + 1]:
            j += 1
        if j > i:
            first, last = overrides[i].partition("=")[2], overrides[j].partition("=")[2]
            head = os.path.commonprefix([first, last])
            tail = os.path.commonprefix([first[::-1], last[::-1]])[::-1]
            while head and head[-1].isdigit():  # the run of digits that varies belongs inside the braces
                head = head[:-1]
            while tail and tail[0].isdigit():
                tail = tail[1:]
            a, b = first[len(head):len(first) - len(tail)], last[len(head):len(last) - len(tail)]
            values = [item.partition("=")[2] for item in overrides[i:j + 1]]
            if (head or tail) and a.isdigit() and b.isdigit() and values == [
                    f"{head}{n:0{len(a)}d}{tail}" for n in range(int(a), int(a) + j - i + 1)]:
                raise ConfigError(f"overrides {overrides[i]} ... {overrides[j]}: the shell expanded a brace pattern "
                                  f"into {j - i + 1} overrides; quote it: {key}='{head}{{{a}..{b}}}{tail}'")
        i = j + 1


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML; `section.key.name=value` sets one entry of a
    mapping such as collapse.thresholds) to a copy of a raw config dict. A moved key's old name sets its new
    place, with a deprecation warning."""
    _refuse_shell_expanded(overrides)
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    set_by = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) not in (2, 3, 4) or not all(parts):
            raise ConfigError(f"override {item} must look like section.key=value (e.g. optimization.epochs=2)")
        path, tp, renamed = _override_path(item, parts)
        earlier = set_by.get(path)
        if earlier is not None and earlier[1] != renamed:
            raise ConfigError(f"overrides {earlier[0]} and {item} both set {_dotted(path)} (one by its old name); "
                              f"keep one")
        set_by[path] = (item, renamed)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item}: value is not valid YAML ({exc.__class__.__name__})") from None
        _coerce(value, tp, f"override {item}: {_dotted(path)}")
        _holder(raw, path, f"override {item}")[path[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a YAML config (not UTF-8 text: a checkpoint or other binary file?)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None or raw == {}:
        raise ConfigError(
            f"{path} is empty: a config names at least its data (data.shards or data.root_path) and its model "
            f"(meta.model_name); on defaults alone it would train vit_base at 224 px for 100 epochs"
        )
    raw = without_run_info(raw)
    _check_sections(raw, str(path))
    # The file's old key names are moved (and warned about) before the overrides, which then replace them.
    raw = apply_overrides(_move_renamed(raw, str(path)), overrides or [])
    return config_from_dict(raw, where=str(path))


def dump_config(cfg: Config, run_info: dict | None = None) -> str:
    """The resolved config as YAML; `run_info` (version.run_info()) goes first, under `ijepa_scale`."""
    head = {RUN_INFO_KEY: run_info} if run_info else {}
    return yaml.safe_dump({**head, **cfg.to_dict()}, sort_keys=False)
