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
from .features import RAW_PIXELS, FeatureSet, Progress, extract_feature_sets, gather_features, raw_pixel_features
from .knn import knn_predict
from .linear import CV_FOLDS, feature_stats, few_shot_probe, linear_probe, sample_shots

logger = logging.getLogger("ijepa_scale")

METHODS = ("linear", "knn")
DEFAULT_SEEDS = 5  # few-shot draws per N
RAW_PIXELS_KEY = "raw pixels"
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
    """Accuracy per method (the same on every rank), plus n_train, n_val and seconds per method."""
    result = evaluate_encoders({"": encoder}, train_source, val_source, methods, crop_size=crop_size, pool=pool,
                               batch_size=batch_size, num_workers=num_workers, device=device, rank=rank,
                               world_size=world_size, progress_every_s=progress_every_s)
    for row in result.pop("rows")[""]:
        result[row["method"]] = row["accuracy"]
        result[f"{row['method']}_seconds"] = row["seconds"]
    return result


def evaluate_encoders(encoders: dict, train_source, val_source, methods=("knn",), *, crop_size: int,
                      pool: str = "mean", shots=(), seeds: int = DEFAULT_SEEDS, batch_size: int = 256,
                      num_workers: int = 0, device: torch.device = torch.device("cpu"), rank: int = 0,
                      world_size: int = 1, progress_every_s: float = 5.0) -> dict:
    """Every protocol for every encoder ({name: module, or features.RAW_PIXELS}) from one read of the shards.

    Protocols: each of `methods` on all training labels, and, for each N in `shots`, the same methods
    fitted on N training images per class, repeated over `seeds` draws. Returns {n_train, n_val, skipped,
    extract_seconds, rows: {name: [row]}} with a row {method, shots, seeds, accuracy, accuracy_std, l2,
    l2_grid, n_train, seconds} per protocol, the same on every rank.

    Train features are gathered on every rank. Full-label k-NN scores each rank's own val features and
    sums the correct counts; the probes and few-shot draws are shared out among the ranks (they run on
    every rank's copy of the features) and their results gathered.
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    start = time.perf_counter()
    common = dict(crop_size=crop_size, pool=pool, batch_size=batch_size, num_workers=num_workers, device=device,
                  rank=rank, world_size=world_size, progress_every_s=progress_every_s)
    train = extract_feature_sets(encoders, train_source, desc="train features", **common)
    val = extract_feature_sets(encoders, val_source, desc="val features", gather=False, **common)
    for name, encoder in encoders.items():
        if encoder is RAW_PIXELS:
            train[name], val[name] = raw_pixel_features(train[name], val[name], crop_size)
    extract_s = time.perf_counter() - start
    first = next(iter(encoders))
    train_labels, local_labels = train[first].labels, val[first].labels
    # Every rank needs the class count and the val size: gathered from each rank's val labels.
    local = (len(local_labels), int(local_labels.min()) if len(local_labels) else 0,
             int(local_labels.max()) if len(local_labels) else -1)
    stats = dist_utils.all_gather_objects(local)
    n_val = sum(s[0] for s in stats)
    if n_val == 0 or len(train_labels) == 0:
        raise UserError("no readable sample in the evaluation shards")
    lowest = min([int(train_labels.min())] + [s[1] for s in stats if s[0]])
    if lowest < 0:
        raise UserError("the evaluation shards have samples without a class label (.cls member); "
                        "make them with `ijepa-scale make-shards` or `ijepa-scale fashion-mnist`")
    num_classes = max([int(train_labels.max())] + [s[2] for s in stats]) + 1
    counts = torch.bincount(train_labels, minlength=num_classes)
    for n in shots:
        if n > int(counts.min()):
            raise UserError(f"--shots {n}: class {int(counts.argmin())} has only {int(counts.min())} training "
                            f"image(s) in --train-shards; use at most {int(counts.min())} shots")
    # Full-label k-NN: every rank scores its own val features.
    knn_full = {}
    if "knn" in methods:
        for name in encoders:
            began = time.perf_counter()
            correct = torch.zeros(1, dtype=torch.float64)
            if len(val[name].labels):
                predicted = knn_predict(train[name].features, train[name].labels, val[name].features, num_classes)
                correct[0] = float((predicted == val[name].labels).sum())
            knn_full[name] = (float(dist_utils.all_reduce_sum(correct).item()) / n_val, time.perf_counter() - began)
    # Everything else: jobs shared out among the ranks, on the gathered val features.
    jobs = [(name, "linear", 0, 0) for name in encoders if "linear" in methods]
    jobs += [(name, method, n, seed) for n in shots for name in encoders for method in methods
             for seed in range(seeds)]
    whole_val = {name: gather_features(val[name]) for name in encoders} if jobs else {}
    shapes = {name: train[name].features.shape for name in encoders}
    mine = assign_jobs(jobs, shapes, n_val, num_classes, world_size)[rank]
    # Progress in percent of the estimated cost: one raw-pixel probe can outweigh dozens of few-shot draws.
    costs = [job_cost(job, shapes, n_val, num_classes) for job in mine]
    scale = 100.0 / max(sum(costs), 1e-9)
    done = {}
    progress = Progress("probes" if world_size == 1 else f"probes (rank 0's {len(mine)} of {len(jobs)} jobs)",
                        100.0, max(progress_every_s, 5.0), enabled=rank == 0 and bool(mine), unit="%")
    for i, job in enumerate(mine):
        name, method, n, seed = job
        label = f"job {i + 1}: {method}{f' {n}-shot seed {seed}' if n else ''}{f', {name}' if name else ''}"
        before = sum(costs[:i]) * scale
        began = time.perf_counter()
        done[job] = run_job(job, train[name], whole_val[name], num_classes,
                            lambda fraction, b=before, c=costs[i] * scale, label=label:
                            progress.update(b + fraction * c, note=label))
        done[job]["seconds"] = time.perf_counter() - began
        progress.update(before + costs[i] * scale, note=label)
    for part in dist_utils.all_gather_objects(done):
        done.update(part)
    rows = {}
    for name in encoders:
        rows[name] = []
        for method in methods:
            if method == "knn":
                accuracy, seconds = knn_full[name]
                rows[name].append(_row(method, 0, [{"accuracy": accuracy, "seconds": seconds}], len(train_labels)))
            else:
                rows[name].append(_row(method, 0, [done[(name, method, 0, 0)]], len(train_labels)))
        for n in shots:
            for method in methods:
                rows[name].append(_row(method, n, [done[(name, method, n, s)] for s in range(seeds)],
                                       n * num_classes))
        for row in rows[name]:
            row["seconds"] += extract_s
    return {"n_train": len(train_labels), "n_val": n_val, "skipped": train[first].skipped,
            "extract_seconds": extract_s, "rows": rows}


def assign_jobs(jobs: list, shapes: dict, n_val: int, num_classes: int, world_size: int) -> list[list]:
    """Jobs per rank, the most expensive first to the least loaded rank (by `job_cost`); the same split
    on every rank."""
    def cost(job):
        return job_cost(job, shapes, n_val, num_classes)

    load, out = [0.0] * world_size, [[] for _ in range(world_size)]
    for index in sorted(range(len(jobs)), key=lambda i: (-cost(jobs[i]), i)):
        target = min(range(world_size), key=lambda r: (load[r], r))
        load[target] += cost(jobs[index])
        out[target].append(jobs[index])
    return out


def job_cost(job, shapes: dict, n_val: int, num_classes: int) -> float:
    """A rough estimate of a job's time: multiply-adds per fit times fits, plus a per-fit overhead."""
    name, method, n, _ = job
    rows, dim = shapes[name]
    if method == "knn":
        return n_val * n * num_classes * dim / 100
    if n == 0:
        return 8 * (rows * dim + 2e5)
    fits = 6 * min(n, CV_FOLDS) + 1 if n > 1 else 1
    return fits * (n * num_classes * dim + 2e5)


def run_job(job, train: FeatureSet, val: FeatureSet, num_classes: int, progress) -> dict:
    """One probe: (name, method, shots (0: all labels), seed) -> {accuracy, l2, selection}."""
    name, method, n, seed = job
    if n == 0:
        probe = linear_probe(train.features, train.labels, val.features, val.labels, num_classes,
                             desc=f"linear probe{f', {name}' if name else ''}", progress=progress)
        return {"accuracy": probe["accuracy"], "l2": probe["l2"], "selection": probe["selection"]}
    index = sample_shots(train.labels, n, seed, num_classes)
    x, y = train.features[index], train.labels[index]
    if method == "knn":
        predicted = knn_predict(x, y, val.features, num_classes)
        return {"accuracy": float((predicted == val.labels).float().mean()), "l2": None, "selection": None}
    # Standardised by all training features: that takes no label.
    return few_shot_probe(x, y, val.features, val.labels, num_classes, n, feature_stats(train.features.float()),
                          seed=seed)


def _row(method: str, shots: int, results: list[dict], n_train: int) -> dict:
    accuracies = torch.tensor([r["accuracy"] for r in results], dtype=torch.float64)
    l2s = sorted({r["l2"] for r in results if r.get("l2") is not None}, reverse=True)
    selections = [r["selection"] for r in results if r.get("selection")]
    grid = ""
    if selections:
        lo = min(s["grid"][0] for s in selections)
        hi = max(s["grid"][1] for s in selections)
        widened = sum(1 for s in selections if s["widened"])
        grid = f"{lo:g}..{hi:g}"
        if widened:
            grid += ", widened" if len(selections) == 1 else f", widened in {widened} of {len(selections)}"
        if any(s["at_bound"] for s in selections):
            grid += ", best at the bound"
    elif l2s:
        grid = "fixed"
    return {"method": method, "shots": shots or "", "seeds": len(results) if shots else "",
            "accuracy": float(accuracies.mean()),
            "accuracy_std": float(accuracies.std()) if len(accuracies) > 1 else "",
            "l2": "/".join(f"{v:g}" for v in l2s), "l2_grid": grid, "n_train": n_train,
            "seconds": sum(r["seconds"] for r in results)}


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
                   device: torch.device, rank: int, world_size: int, raw_pixels: bool = False, shots=(),
                   seeds: int = DEFAULT_SEEDS) -> list[dict]:
    """Result rows (table.CSV_COLUMNS) of `key`, plus its random-weight twin (`random_init`) and the raw
    pixels (`raw_pixels`), each under every requested protocol; one read of the shards serves them all."""
    state = read_checkpoint(checkpoint)
    info = describe_checkpoint(checkpoint, key, state)
    encoder, img_size = build_eval_encoder(checkpoint, key, state=state)
    encoders = {key: encoder.to(device)}
    if random_init:
        twin, _ = build_eval_encoder(checkpoint, key, random_init=True, state=state)
        encoders[f"{key} (random init)"] = twin.to(device)
    if raw_pixels:
        encoders[RAW_PIXELS_KEY] = RAW_PIXELS
    del state
    if rank == 0:
        logger.info("evaluating %s of %s (step %s), pool %s, %d train / %d val images", ", ".join(encoders),
                    checkpoint, info["step"], pool, train_source.num_samples, val_source.num_samples)
    try:
        result = evaluate_encoders(encoders, train_source, val_source, methods, crop_size=crop_size or img_size,
                                   pool=pool, shots=shots, seeds=seeds, batch_size=batch_size,
                                   num_workers=num_workers, device=device, rank=rank, world_size=world_size)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    rows = []
    for name, encoder in encoders.items():
        for row in result["rows"][name]:
            raw = encoder is RAW_PIXELS
            rows.append({"checkpoint": str(checkpoint), "step": "" if raw else info["step"], "key": name,
                         "pool": "" if raw else pool, **row, "accuracy": round(row["accuracy"], 6),
                         "accuracy_std": row["accuracy_std"] if row["accuracy_std"] == ""
                         else round(row["accuracy_std"], 6),
                         "n_val": result["n_val"], "seconds": round(row["seconds"], 1)})
    return rows
