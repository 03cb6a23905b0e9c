"""One evaluation: features of the train and val shards from a frozen encoder, then k-NN and/or a linear probe."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from ..distributed import env as dist_utils
from ..checkpoint import safe_load
from ..data.sources import open_shards
from ..errors import UserError
from .features import extract_features, gather_features
from .knn import knn_predict
from .linear import linear_probe

logger = logging.getLogger("ijepa_scale")

METHODS = ("linear", "knn")
KEYS = ("target_encoder", "encoder", "gated", "all_open")
# Gated I-JEPA runs are also evaluated as the original did: predictor tokens behind hard gates (gated) or
# without gates (all_open).
GATED_KEYS = ("gated", "all_open")


def open_eval_shards(pattern: str, what: str):
    try:
        return open_shards(pattern)
    except FileNotFoundError as exc:
        message = str(exc).split("; check data.shards")[0]  # the training key is not what the user set here
        raise UserError(f"{what}: {message}") from None


def evaluate(encoder: torch.nn.Module, train_source, val_source, methods=("knn",), *, crop_size: int,
             pool: str = "mean", batch_size: int = 256, num_workers: int = 0,
             device: torch.device = torch.device("cpu"), rank: int = 0, world_size: int = 1,
             progress_every_s: float = 5.0) -> dict:
    """Accuracy per method (the same on every rank), plus n_train, n_val and seconds per method.

    Train features are gathered on every rank; k-NN scores each rank's own val features and sums
    the correct counts; the linear probe is fitted on rank 0 and its accuracy broadcast.
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    start = time.perf_counter()
    common = dict(crop_size=crop_size, pool=pool, batch_size=batch_size, num_workers=num_workers, device=device,
                  rank=rank, world_size=world_size, progress_every_s=progress_every_s)
    train = extract_features(encoder, train_source, desc="train features", **common)
    val = extract_features(encoder, val_source, desc="val features", gather=False, **common)
    extract_s = time.perf_counter() - start
    # Every rank needs the class count and the val size: gathered from each rank's val labels.
    local = (len(val.labels), int(val.labels.min()) if len(val.labels) else 0,
             int(val.labels.max()) if len(val.labels) else -1)
    stats = dist_utils.all_gather_objects(local)
    n_val = sum(s[0] for s in stats)
    if n_val == 0 or len(train.labels) == 0:
        raise UserError("no readable sample in the evaluation shards")
    lowest = min([int(train.labels.min())] + [s[1] for s in stats if s[0]])
    if lowest < 0:
        raise UserError("the evaluation shards have samples without a class label (.cls member); "
                        "make them with `ijepa-scale make-shards` or `ijepa-scale fashion-mnist`")
    num_classes = max([int(train.labels.max())] + [s[2] for s in stats]) + 1
    result = {"n_train": len(train.labels), "n_val": n_val, "skipped": train.skipped, "extract_seconds": extract_s}
    for method in methods:
        began = time.perf_counter()
        if method == "knn":
            correct = torch.zeros(1, dtype=torch.float64)
            if len(val.labels):
                predicted = knn_predict(train.features, train.labels, val.features, num_classes)
                correct[0] = float((predicted == val.labels).sum())
            accuracy = float(dist_utils.all_reduce_sum(correct).item()) / result["n_val"]
        else:
            everything = gather_features(val)
            accuracy = None
            if rank == 0:
                accuracy = linear_probe(train.features, train.labels, everything.features, everything.labels,
                                        num_classes)["accuracy"]
            accuracy = dist_utils.broadcast_object(accuracy)
        result[method] = accuracy
        result[f"{method}_seconds"] = time.perf_counter() - began + extract_s
    return result


# ---------------------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(source: str) -> Path:
    """A local checkpoint file: the file itself, a run folder's `*-latest.pth.tar`, or a downloaded URL
    (a registry name such as `ijepa_vith14_1k` is its URL)."""
    from ..weights import fetch
    from ..weights.registry import is_url, resolve_source

    source = resolve_source(source)
    if is_url(source):
        return Path(fetch(source))
    from ..checkpoint.dcp import is_dcp_checkpoint
    from ..checkpoint.files import run_folder_latest

    path = Path(source)
    if is_dcp_checkpoint(path):
        return path
    if path.is_dir():
        latest = run_folder_latest(path)
        if len(latest) != 1:
            found = "none" if not latest else ", ".join(p.name for p in latest)
            raise UserError(f"--checkpoint {source}: a run folder must hold exactly one *-latest.pth.tar "
                            f"(found {found}); pass the checkpoint file instead")
        return latest[0]
    if not path.is_file():
        raise UserError(f"--checkpoint {source}: no such file or folder")
    return path


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """The checkpoint dict at `path` (a file or a `.dcp` folder), read as data only; a file that cannot be
    read is one line (UserError)."""
    from ..weights import load_checkpoint

    try:
        if path.is_dir():
            from ..checkpoint.dcp import consolidate

            return consolidate(path)
        if mmap:
            return safe_load.load(path, mmap=True)
        return load_checkpoint(path, map_location="cpu")
    except UserError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"--checkpoint {path}: cannot load it ({type(exc).__name__}: {first})") from None


def describe_checkpoint(path: Path, key: str, state: Optional[dict] = None) -> dict:
    """Checks that the checkpoint at `path` has `key`; returns its step and config (None if it has none).
    A cheap (memory-mapped) look, unless the caller has read it already (`state`)."""
    if state is None:
        state = read_checkpoint(path, mmap=True)
    if not isinstance(state, dict):
        raise UserError(f"--checkpoint {path}: not a checkpoint dict")
    if key in GATED_KEYS:
        from ..objectives import saved_objective

        objective = saved_objective(state.get("config"))
        if objective != "gated" or "student" not in state:
            raise UserError(f"--key {key} evaluates a meta.objective=gated run, and {path} is a meta.objective="
                            f"{objective} checkpoint; use --key target_encoder")
    elif key not in state:
        keys = ", ".join(k for k in state if isinstance(state[k], dict) and k in KEYS + ("predictor",)) or "none"
        raise UserError(f"--checkpoint {path}: no {key!r} weights (it has: {keys}); pick --key {'/'.join(KEYS)}")
    step = state.get("step")
    if step is None and "epoch" in state:
        step = f"ep{state['epoch']}"
    return {"step": "" if step is None else step, "config": state.get("config")}


def build_eval_encoder(path: Path, key: str, random_init: bool = False, seed: int = 0,
                       state: Optional[dict] = None) -> tuple[torch.nn.Module, int]:
    """The frozen encoder (eval mode) of `key` and the image size it expects: the one way `eval` and `analyze`
    build a network from a checkpoint.

    Our checkpoints carry their config, which gives the architecture (ViT, energy transformer, ConvNeXt;
    `gated`/`all_open` give a Gated I-JEPA run's student and predictor); an official or Hugging Face
    checkpoint's ViT is inferred from the weights (:mod:`ijepa_scale.weights`). `random_init` keeps the
    architecture, not the weights. `state`: the checkpoint at `path`, if the caller has read it already.
    """
    from ..weights.load import encoder_for, load_encoder
    from ..weights.official import strip_prefixes

    if state is None:
        state = read_checkpoint(path)
    config = state.get("config")
    if key in GATED_KEYS:
        return _gated_features(state, key, random_init)
    weights = strip_prefixes(state[key])
    torch.manual_seed(seed)
    size = None
    if isinstance(config, dict) and "meta" in config:
        from ..objectives import evaluated_network, saved_objective

        if key != "target_encoder" and saved_objective(config) not in ("ijepa", "pkt"):
            raise UserError(f"--key {key}: a meta.objective={config['meta']['objective']} run is evaluated by its "
                            f"target_encoder (the EMA teacher); use --key target_encoder")
        encoder, size = evaluated_network(config)
        if not random_init:
            encoder.load_state_dict(weights)
    elif random_init:
        encoder = encoder_for(weights)
    else:
        encoder = load_encoder(state, key=key)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval(), int(size or encoder.img_size)


def gated_networks(state: dict, load_weights: bool = True) -> tuple[dict, int]:
    """({student, predictor} of a Gated I-JEPA checkpoint, the image side), rebuilt from its saved config;
    gated settings this version does not know are ignored."""
    from ..objectives import evaluated_network, settings_from_saved
    from ..objectives.gated import GatedConfig, GatedObjective
    from ..weights.official import strip_prefixes

    config = state["config"]
    encoder, size = evaluated_network(config)
    meta = config["meta"]
    settings = settings_from_saved(GatedConfig, config.get("gated"))
    networks = GatedObjective(settings).build_networks(encoder, pred_depth=meta["pred_depth"],
                                                       pred_emb_dim=meta["pred_emb_dim"])
    if load_weights:
        for name in ("student", "predictor"):
            networks[name].load_state_dict(strip_prefixes(state[name]))
    return networks, size


def _gated_features(state: dict, mode: str, random_init: bool) -> tuple[torch.nn.Module, int]:
    from ..objectives.gated import GatedFeatures

    networks, size = gated_networks(state, load_weights=not random_init)
    model = GatedFeatures(networks["student"], networks["predictor"], mode)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), size


def run_evaluation(checkpoint: Path, key: str, methods, train_source, val_source, *, pool: str,
                   random_init: bool, crop_size: Optional[int], batch_size: int, num_workers: int,
                   device: torch.device, rank: int, world_size: int) -> list[dict]:
    state = read_checkpoint(checkpoint)
    info = describe_checkpoint(checkpoint, key, state)
    encoder, img_size = build_eval_encoder(checkpoint, key, random_init=random_init, state=state)
    encoder.to(device)
    if rank == 0:
        logger.info("evaluating %s%s of %s (step %s), pool %s, %d train / %d val images",
                    key, " (random init)" if random_init else "", checkpoint, info["step"], pool,
                    train_source.num_samples, val_source.num_samples)
    try:
        result = evaluate(encoder, train_source, val_source, methods, crop_size=crop_size or img_size, pool=pool,
                          batch_size=batch_size, num_workers=num_workers, device=device, rank=rank,
                          world_size=world_size)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return [
        {"checkpoint": str(checkpoint), "step": info["step"], "key": f"{key} (random init)" if random_init else key,
         "pool": pool, "method": method, "accuracy": round(result[method], 6), "n_train": result["n_train"],
         "n_val": result["n_val"], "seconds": round(result[f"{method}_seconds"], 1)}
        for method in methods
    ]
