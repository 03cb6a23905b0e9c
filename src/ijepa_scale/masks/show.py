"""`ijepa-scale show-masks --fname CONFIG --out masks.png`: the configured mask sampler over real images.

Each row is one image of the configured training data after its crop and augmentation: the image,
the context block (what the encoder sees; the rest dimmed), and each target block outlined in its
own colour, as the first batch of training would sample them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


TARGET_COLOURS = ("#e41a1c", "#377eb8", "#ff7f00", "#984ea3", "#a65628", "#f781bf", "#999999", "#4daf4a")


def _grid_mask(indices: torch.Tensor, grid: int) -> np.ndarray:
    mask = np.zeros(grid * grid, dtype=bool)
    mask[indices.numpy()] = True
    return mask.reshape(grid, grid)


def sample_batch(cfg, num_images: int, step: int = 0):
    """`num_images` augmented images (uint8 [N,3,H,W]) with the masks the collator draws at `step`."""
    from ..data.sources import build_source
    from ..data.stream import DataStream
    from ..data.transforms import ImageTransform
    from . import MultiBlockMaskCollator

    collator = MultiBlockMaskCollator(
        input_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size, enc_mask_scale=cfg.mask.enc_mask_scale,
        pred_mask_scale=cfg.mask.pred_mask_scale, aspect_ratio=cfg.mask.aspect_ratio,
        nenc=cfg.mask.num_enc_masks, npred=cfg.mask.num_pred_masks, min_keep=cfg.mask.min_keep,
        allow_overlap=cfg.mask.allow_overlap, legacy_sampler=cfg.mask.legacy_sampler, seed=cfg.meta.seed, rank=0,
    )
    transform = ImageTransform(
        crop_size=cfg.data.crop_size, crop_scale=cfg.data.crop_scale, horizontal_flip=cfg.data.use_horizontal_flip,
        color_distortion=cfg.data.use_color_distortion, color_jitter_strength=cfg.data.color_jitter_strength,
        gaussian_blur=cfg.data.use_gaussian_blur,
    )
    source = build_source(cfg.data)
    batch_size = min(num_images, source.num_samples)
    stream = DataStream(source, transform, collator, batch_size=batch_size, num_workers=0, rank=0, world_size=1,
                        seed=cfg.meta.seed, shuffle_buffer=cfg.data.shuffle_buffer, on_error="skip")
    batch = next(iter(stream.epoch_batches()))
    masks_enc, masks_pred = collator.sample(batch_size, step=step, rank=0)
    return batch["images"], masks_enc, masks_pred


def draw(images: torch.Tensor, masks_enc, masks_pred, patch_size: int, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n, _, height, _ = images.shape
    grid = height // patch_size
    cols = 2 + len(masks_pred)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n + 0.6), squeeze=False)
    for i in range(n):
        picture = images[i].permute(1, 2, 0).numpy()
        axes[i][0].imshow(picture)
        if i == 0:
            axes[i][0].set_title("image", fontsize=9)
        context = np.zeros((grid, grid), dtype=bool)
        for m in masks_enc:
            context |= _grid_mask(m[i], grid)
        dim = np.kron(~context, np.ones((patch_size, patch_size), dtype=bool))[..., None]
        shown = np.where(dim, (picture * 0.25).astype(picture.dtype), picture)
        axes[i][1].imshow(shown)
        if i == 0:
            axes[i][1].set_title(f"context ({int(context.sum())}/{grid * grid})", fontsize=9)
        for t, m in enumerate(masks_pred):
            ax = axes[i][2 + t]
            ax.imshow(shown)
            target = _grid_mask(m[i], grid)
            colour = TARGET_COLOURS[t % len(TARGET_COLOURS)]
            for r, c in zip(*np.nonzero(target)):
                ax.add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size,
                                       facecolor=colour, alpha=0.45, edgecolor=colour, lw=0.6))
            if i == 0:
                ax.set_title(f"target {t + 1} ({int(target.sum())})", fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

