"""`ijepa-scale analyze attention|corrdim|umap|gates`: pictures of what a checkpoint's encoder learned.

    ijepa-scale analyze corrdim --checkpoint logs/demo_fmnist --out analysis \\
        --shards 'data/fmnist/fmnist-test-{000000..000001}.tar'

Images are read from tar shards exactly as `ijepa-scale eval` reads them (centre square resized to the
checkpoint's crop size, normalised; labels from .cls). Each subcommand writes PNGs and a table of its
numbers into --out and prints one line naming them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..distributed.env import parse_device
from ..errors import UserError
from ..objectives import saved_objective

logger = logging.getLogger("ijepa_scale")

SUBCOMMANDS = ("attention", "corrdim", "umap", "gates")
LOG_BASE = 10.0  # both axes of the correlation integral; the slope does not depend on it
UMAP_INSTALL = "pip install 'ijepa-scale[umap]' (or: .venv/bin/pip install umap-learn)"


# ------------------------------------------------------------------------------------------- inputs
def open_images(pattern: str):
    from .evaluate import open_eval_shards

    return open_eval_shards(pattern, "--shards")


def read_batches(source, count: int, size: int, batch_size: int,
                 desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 [b, 3, size, size], labels [b]) batches of the first ``count`` readable samples of ``source``,
    in the order `eval` reads them; unreadable samples are skipped with a warning."""
    from .features import Progress, _SliceDataset

    total = min(count, source.num_samples)
    progress = Progress(desc, total)
    done = skipped = 0
    for images, labels, errors in _SliceDataset(source, 0, source.num_samples, batch_size, size):
        if errors:
            logger.warning("%s: skipped %d unreadable sample(s), e.g. %s", desc, len(errors), errors[0])
            skipped += len(errors)
        take = min(len(images), total - done)
        if take:
            done += take
            yield images[:take], labels[:take]
        progress.update(min(total, done + skipped))
        if done >= total:
            break
    if done == 0:
        raise UserError(f"--shards: no readable image among {source.num_samples} sample(s)")


def class_names(pattern: str) -> list[str]:
    """Class names from the shards' index (written by make-shards / fashion-mnist), or [] if there is none."""
    from ..data.sources import index_candidates, read_json, expand_urls

    try:
        for candidate in index_candidates(expand_urls(pattern)):
            index = read_json(candidate)
            if index and isinstance(index.get("classes"), list):
                return [str(name) for name in index["classes"]]
    except Exception:  # names only label the legend; a missing or odd index is not an error
        pass
    return []


def convnext_backbone(config) -> str | None:
    """The ConvNeXt size of a saccade checkpoint's encoder (saccade.backbone), None for a ViT."""
    if not isinstance(config, dict):
        return None
    if saved_objective(config) != "saccade":
        return None
    backbone = (config.get("saccade") or {}).get("backbone", "vit")
    return None if backbone == "vit" else str(backbone)


def load_encoder(checkpoint: Path, key: str, device: torch.device, need_vit: bool = False):
    """(frozen encoder, image size, describe_checkpoint's info) of ``key``, built by `eval`'s loader from one
    read of the file; ``need_vit`` refuses a non-ViT (a saccade ConvNeXt, the energy transformer) with one line."""
    from ..models.vision_transformer import VisionTransformer
    from .evaluate import build_eval_encoder, describe_checkpoint, read_checkpoint

    state = read_checkpoint(checkpoint)
    info = describe_checkpoint(checkpoint, key, state)
    encoder, size = build_eval_encoder(checkpoint, key, state=state)
    if need_vit and not isinstance(encoder, VisionTransformer):
        backbone = convnext_backbone(info["config"])
        what = (f"a ConvNeXt (saccade.backbone={backbone}), which has no attention maps" if backbone
                else f"a {type(encoder).__name__}, not a ViT")
        raise UserError(f"--checkpoint {checkpoint}: its {key} is {what}; `analyze attention` needs a ViT encoder "
                        f"(corrdim and umap work here)")
    return encoder.to(device), size, info


def normalized(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    from ..data.transforms import normalize

    return normalize(images.to(device))


def token_features(encoder, x: torch.Tensor) -> torch.Tensor:
    """[B, T, D] tokens of a ViT; [B, 1, D] for an encoder that outputs one vector per image (ConvNeXt)."""
    out = encoder(x)
    return out if out.dim() == 3 else out.reshape(len(out), 1, -1)


def write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _resolve_index(value: int, count: int, flag: str, what: str) -> int:
    if not -count <= value < count:
        raise UserError(f"{flag} {value}: the encoder has {count} {what}; use 0..{count - 1} "
                        f"(or -{count}..-1 counted from the end)")
    return value % count


# ---------------------------------------------------------------------------------------- attention
def attention_perplexity(maps: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each query's attention row, averaged over images and queries: [heads].
    1 means every query looks at one key, N means uniform attention over all N keys."""
    entropy = -(maps * maps.clamp_min(1e-12).log()).sum(dim=-1)  # [B, heads, N]
    return entropy.exp().mean(dim=(0, 2))


def run_attention(args) -> tuple[list[Path], str]:
    from .analysis import attention_grid, attention_maps, save_image_grid
    from .evaluate import resolve_checkpoint

    device = parse_device(args.device, flag="--device")
    checkpoint = resolve_checkpoint(args.checkpoint)
    source = open_images(args.shards)
    encoder, size, _ = load_encoder(checkpoint, args.key, device, need_vit=True)
    layers = [_resolve_index(v, len(encoder.blocks), "--layers", "blocks") for v in args.layers]
    heads = (list(range(encoder.num_heads)) if args.heads is None
             else [_resolve_index(v, encoder.num_heads, "--heads", "heads") for v in args.heads])
    size = args.crop_size or size
    if args.patch is not None:
        tokens = (size // encoder.patch_size) ** 2
        args.patch = _resolve_index(args.patch, tokens, "--patch", "patch tokens")
    batch = torch.cat([images for images, _ in read_batches(source, args.num_images, size, args.batch_size,
                                                            "attention images")])
    x = normalized(batch, device)
    with torch.no_grad():
        scale = args.scale or max(1, round(112 / size))
        tiles = attention_grid(encoder, x, layers, heads, patch=args.patch, scale=scale).cpu()
        maps = attention_maps(encoder, x, layers)
    out = Path(args.out)
    png = save_image_grid(tiles, out / "attention.png", pad=2)
    labels = ["image"] + [f"L{layer} h{head}" for layer in layers for head in heads]
    _add_header(png, labels, tile=tiles.shape[-1], pad=2)
    rows = []
    for layer in layers:
        perplexity = attention_perplexity(maps[layer])
        rows += [(layer, head, round(float(perplexity[head]), 4)) for head in heads]
    table = write_csv(out / "attention.csv", ["layer", "head", "perplexity"], rows)
    target = "mean attention each key receives" if args.patch is None else f"attention to patch {args.patch}"
    return [png, table], (f"attention: {len(batch)} images x {len(labels) - 1} maps (layers {layers}, heads "
                          f"{heads}; {target}) -> {png}, {table}")


def _add_header(path: Path, labels: list[str], tile: int, pad: int, height: int = 14) -> None:
    """Prefix the grid PNG with one text label per column."""
    from PIL import Image, ImageDraw

    with Image.open(path) as grid:
        canvas = Image.new("RGB", (grid.width, grid.height + height), "white")
        canvas.paste(grid, (0, height))
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(labels):
        draw.text((pad + column * (tile + pad) + 2, 2), label, fill="black")
    canvas.save(path)


# ----------------------------------------------------------------------------------------- corrdim
def sample_tokens(encoder, batches, num_images: int, num_points: int, device,
                  generator) -> tuple[torch.Tensor, int, int]:
    """Up to ``num_points`` patch tokens drawn uniformly from all tokens of the images (kept per batch in
    proportion, so memory stays near num_points rows), the number of images read and tokens per image."""
    kept, images, per_image = [], 0, 1
    with torch.no_grad():
        for batch, _ in batches:
            tokens = token_features(encoder, normalized(batch, device))
            per_image = tokens.shape[1]
            tokens = tokens.flatten(0, 1).float().cpu()
            share = min(len(tokens), math.ceil(num_points * len(batch) / num_images) + 1)
            kept.append(tokens[torch.randperm(len(tokens), generator=generator)[:share]])
            images += len(batch)
    points = torch.cat(kept)
    if len(points) > num_points:
        points = points[torch.randperm(len(points), generator=generator)[:num_points]]
    return points, images, per_image


def run_corrdim(args) -> tuple[list[Path], str]:
    from .analysis import correlation_dimension, plot_correlation_dimension
    from .evaluate import resolve_checkpoint

    device = parse_device(args.device, flag="--device")
    checkpoint = resolve_checkpoint(args.checkpoint)
    source = open_images(args.shards)
    encoder, size, _ = load_encoder(checkpoint, args.key, device)
    size = args.crop_size or size
    generator = torch.Generator().manual_seed(args.seed)
    count = min(args.num_images, source.num_samples)
    batches = read_batches(source, count, size, args.batch_size, "corrdim images")
    points, num_images, per_image = sample_tokens(encoder, batches, count, args.num_points, device, generator)
    try:
        result = correlation_dimension(points, num_radii=args.num_radii, base=LOG_BASE)
    except ValueError as exc:
        raise UserError(f"correlation dimension of {len(points)} points: {exc}") from None
    out = Path(args.out)
    png = plot_correlation_dimension(result, out / "corrdim.png")
    table = write_csv(out / "corrdim.csv", ["log10_r", "log10_C"],
                      [(round(float(r), 6), round(float(c), 6)) for r, c in zip(result.log_radii, result.log_counts)])
    r_lo, r_hi = float(LOG_BASE ** result.log_radii[0]), float(LOG_BASE ** result.log_radii[-1])
    summary = {"dimension": result.dimension, "intercept": result.intercept, "log_base": LOG_BASE,
               "fit_r_min": r_lo, "fit_r_max": r_hi, "fit_radii": len(result.log_radii),
               "num_points": len(points), "num_images": num_images, "key": args.key, "checkpoint": str(checkpoint)}
    info = out / "corrdim.json"
    info.write_text(json.dumps(summary, indent=2) + "\n")
    what = "patch tokens" if per_image > 1 else "image vectors"
    return [png, table, info], (f"corrdim: correlation dimension {result.dimension:.3f} (slope of log10 C(r) on "
                                f"log10 r, fit over r in [{r_lo:.4g}, {r_hi:.4g}], {len(result.log_radii)} radii; "
                                f"{len(points)} {what} of {num_images} images) -> {png}, {table}, {info}")


# -------------------------------------------------------------------------------------------- umap
def import_umap():
    try:
        import umap
    except ImportError as exc:
        raise UserError(f"`analyze umap` needs umap-learn, which is not installed ({exc}); {UMAP_INSTALL}") from None
    return umap


def pooled(encoder, x: torch.Tensor) -> torch.Tensor:
    return token_features(encoder, x).mean(dim=1)


def plot_embedding(xy: np.ndarray, labels: np.ndarray, names: list[str], path: Path, title: str) -> Path:
    """Scatter of 2-D points coloured by class with a legend (unlabelled points in grey)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    classes = sorted(set(int(v) for v in labels))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "turbo")
    marker = float(np.clip(20000 / max(len(xy), 1), 4, 30))
    for rank, cls in enumerate(classes):
        chosen = labels == cls
        colour = "grey" if cls < 0 else cmap(rank if len(classes) <= 10 else rank / max(len(classes) - 1, 1))
        name = "unlabelled" if cls < 0 else (names[cls] if cls < len(names) else f"class {cls}")
        ax.scatter(xy[chosen, 0], xy[chosen, 1], s=marker, alpha=0.6, color=colour, label=name, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=max(1.0, 20 / marker),
              frameon=False)
    fig.subplots_adjust(left=0.03, right=0.75, top=0.93, bottom=0.03)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_umap(args) -> tuple[list[Path], str]:
    from .evaluate import resolve_checkpoint

    umap = import_umap()
    device = parse_device(args.device, flag="--device")
    checkpoint = resolve_checkpoint(args.checkpoint)
    source = open_images(args.shards)
    encoder, size, _ = load_encoder(checkpoint, args.key, device)
    size = args.crop_size or size
    features, labels = [], []
    with torch.no_grad():
        for batch, batch_labels in read_batches(source, args.num_images, size, args.batch_size, "umap images"):
            features.append(pooled(encoder, normalized(batch, device)).float().cpu())
            labels.append(batch_labels)
    x = torch.cat(features).double()
    y = torch.cat(labels).numpy()
    if len(x) < 4:
        raise UserError(f"--num-images {args.num_images}: UMAP needs at least 4 images, read {len(x)}")
    x = (x - x.mean(dim=0)) / x.std(dim=0).clamp_min(1e-12)  # per-feature standardisation, as the original
    logger.info("umap: embedding %d pooled features of width %d (numba compiles UMAP first: up to a minute on CPU)",
                len(x), x.shape[1])
    reducer = umap.UMAP(n_neighbors=min(args.n_neighbors, len(x) - 1), random_state=args.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value")  # a fixed seed runs UMAP on one thread
        xy = np.asarray(reducer.fit_transform(x.numpy()))
    out = Path(args.out)
    names = class_names(args.shards)
    png = plot_embedding(xy, y, names, out / "umap.png",
                         f"UMAP of mean-pooled {args.key} features, {len(x)} images ({checkpoint.name})")
    table = write_csv(out / "umap.csv", ["x", "y", "label"],
                      [(round(float(a), 5), round(float(b), 5), int(c)) for (a, b), c in zip(xy, y)])
    return [png, table], f"umap: {len(x)} images, {len(set(y.tolist()))} classes -> {png}, {table}"


# ------------------------------------------------------------------------------------------- gates
def load_gated(checkpoint: Path, device: torch.device):
    """(student GatedViT, predictor, teacher, image size) of a Gated I-JEPA checkpoint, all in eval mode."""
    from .evaluate import build_eval_encoder, gated_networks, read_checkpoint

    state = read_checkpoint(checkpoint)
    config = state.get("config") if isinstance(state, dict) else None
    objective = saved_objective(config) if isinstance(config, dict) else None
    if objective != "gated":
        what = f"meta.objective={objective}" if objective else "no config (an official or exported checkpoint)"
        raise UserError(f"--checkpoint {checkpoint}: has {what}; `analyze gates` needs a Gated I-JEPA checkpoint "
                        f"(trained with meta.objective=gated)")
    missing = [k for k in ("student", "predictor", "target_encoder") if k not in state]
    if missing:
        raise UserError(f"--checkpoint {checkpoint}: a gated checkpoint without {', '.join(missing)} weights; "
                        f"pass a training checkpoint (jepa-latest.pth.tar or a run folder)")
    networks, _ = gated_networks(state)
    teacher, size = build_eval_encoder(checkpoint, "target_encoder", state=state)
    modules = [networks["student"], networks["predictor"], teacher]
    for module in modules:
        module.eval().requires_grad_(False).to(device)
    return (*modules, size)


def gate_statistics(student, predictor, teacher, batches, device, generator) -> dict:
    """The three analyses of the Gated I-JEPA original over all batches: open probabilities per image and
    position, per-image open fraction of real and of N(0, 1) noise images, and the learned / random /
    all-open reconstruction errors (batch means weighted by batch size)."""
    from .analysis import gate_ablation, open_fraction_real_vs_noise, open_probabilities

    probs, real, noise = [], [], []
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for batch, _ in batches:
            x = normalized(batch, device)
            probs.append(open_probabilities(student, x).float().cpu())
            fractions = open_fraction_real_vs_noise(student, x, generator)
            real.append(fractions["real"].float().cpu())
            noise.append(fractions["noise"].float().cpu())
            for name, value in gate_ablation(student, predictor, teacher, x, generator).items():
                sums[name] = sums.get(name, 0.0) + value * len(x)
            count += len(x)
    return {"open_probs": torch.cat(probs), "real": torch.cat(real), "noise": torch.cat(noise),
            "ablation": {name: value / count for name, value in sums.items()}, "num_images": count}


def plot_gate_map(summary: dict, path: Path) -> Path:
    plt = _pyplot()
    grid = summary["map"].numpy()
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=100)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    if grid.shape[0] <= 16:
        for (row, col), value in np.ndenumerate(grid):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.5 else "black")
    ax.set_title(f"mean open probability per patch\ncentre {summary['centre_mean']:.3f}, "
                 f"corners {summary['corner_mean']:.3f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_open_fractions(real: torch.Tensor, noise: torch.Tensor, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    bins = np.linspace(0, 1, 31)
    ax.hist(real.numpy(), bins=bins, alpha=0.6, label=f"real images (mean {real.mean():.3f})")
    ax.hist(noise.numpy(), bins=bins, alpha=0.6, label=f"N(0,1) noise (mean {noise.mean():.3f})")
    ax.set_xlabel("per-image open fraction (mean of sigmoid(log_alpha))")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ablation(rows: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    names = [row["gates"] for row in rows]
    losses = [row["loss"] for row in rows]
    bars = ax.bar(names, losses, color=["tab:blue", "tab:orange", "tab:green"])
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row['loss']:.3f}\nopen {row['open_fraction']:.2f}\n({row['scored_on']})",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("reconstruction error (squared L2, layer-normed)")
    ax.set_ylim(0, max(losses + [1e-6]) * 1.35)
    ax.set_title("learned gates vs random gates (rate: the image's mean open probability) vs all open", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_gates(args) -> tuple[list[Path], str]:
    from .analysis import gate_map_summary
    from .evaluate import resolve_checkpoint

    device = parse_device(args.device, flag="--device")
    checkpoint = resolve_checkpoint(args.checkpoint)
    source = open_images(args.shards)
    student, predictor, teacher, size = load_gated(checkpoint, device)
    size = args.crop_size or size
    generator = torch.Generator().manual_seed(args.seed)
    stats = gate_statistics(student, predictor, teacher,
                            read_batches(source, args.num_images, size, args.batch_size, "gate analysis images"),
                            device, generator)
    summary = gate_map_summary(stats["open_probs"])
    ablation = stats["ablation"]
    rows = [
        {"gates": "learned", "open_fraction": ablation["learned_open_fraction"], "loss": ablation["learned"],
         "scored_on": "closed tokens"},
        {"gates": "random", "open_fraction": ablation["random_open_fraction"], "loss": ablation["random"],
         "scored_on": "closed tokens"},
        {"gates": "all_open", "open_fraction": 1.0, "loss": ablation["all_open"], "scored_on": "all tokens"},
    ]
    real, noise = stats["real"], stats["noise"]
    out = Path(args.out)
    paths = [plot_gate_map(summary, out / "gate_map.png"), plot_open_fractions(real, noise, out / "open_fraction.png"),
             plot_ablation(rows, out / "gate_ablation.png")]
    paths.append(write_csv(out / "gates.csv", ["gates", "open_fraction", "loss", "scored_on"],
                           [(r["gates"], round(r["open_fraction"], 6), round(r["loss"], 6), r["scored_on"])
                            for r in rows]))
    paths.append(write_csv(out / "open_fraction.csv", ["image", "real", "noise"],
                           [(i, round(float(a), 6), round(float(b), 6)) for i, (a, b) in enumerate(zip(real, noise))]))
    paths.append(write_csv(out / "gate_map.csv", [f"col{c}" for c in range(summary["map"].shape[1])],
                           [[round(float(v), 6) for v in row] for row in summary["map"]]))
    std = lambda t: float(t.std()) if len(t) > 1 else 0.0
    lines = [
        f"Gate analysis of `{checkpoint}` on {stats['num_images']} images of `{args.shards}`.",
        "",
        "| gates | open fraction | reconstruction error | scored on |",
        "|---|---|---|---|",
        *[f"| {r['gates']} | {r['open_fraction']:.4f} | {r['loss']:.4f} | {r['scored_on']} |" for r in rows],
        "",
        "| images | open fraction mean | std |",
        "|---|---|---|",
        f"| real | {float(real.mean()):.4f} | {std(real):.4f} |",
        f"| N(0,1) noise | {float(noise.mean()):.4f} | {std(noise):.4f} |",
        "",
        f"Mean open probability: centre (half box) {summary['centre_mean']:.4f}, "
        f"corners (quarter boxes) {summary['corner_mean']:.4f}.",
    ]
    paths.append(out / "gates.md")
    paths[-1].write_text("\n".join(lines) + "\n")
    return paths, (f"gates: {stats['num_images']} images; open fraction real {float(real.mean()):.3f} vs noise "
                   f"{float(noise.mean()):.3f}; error learned {rows[0]['loss']:.4f}, random {rows[1]['loss']:.4f}, "
                   f"all-open {rows[2]['loss']:.4f} -> " + ", ".join(str(p) for p in paths))


# --------------------------------------------------------------------------------------------- CLI
def make_out_dir(path: str) -> Path:
    """Create --out before any work, so that a bad path fails in a second, not after the analysis."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".analyze-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out {path}: cannot write there ({exc.strerror or type(exc).__name__}); "
                        f"pass a writable folder") from None
    return out


RUNNERS = {"attention": run_attention, "corrdim": run_corrdim, "umap": run_umap, "gates": run_gates}
