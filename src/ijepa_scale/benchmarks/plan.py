"""Estimate memory per GPU for a config at every ViT size, under DDP and FSDP, with and without
activation checkpointing, and whether it fits.

    ijepa-scale plan --fname configs/in1k_vith14_ep300.yaml --gpus 16 --gpu-mem 80

The config gives crop, patch, masks (their mean token counts are sampled), predictor width/depth,
per-GPU batch and dtype; the table varies the encoder size.  Parameter counts are exact (the models
are built on the meta device).  Per GPU, in GiB:
- weights: float32 master copies of encoder, target encoder and predictor (under FSDP / N, plus the
  gathered compute-dtype copies of the two largest blocks in flight);
- grads: float32, encoder and predictor; optimizer: AdamW's two float32 moments (both / N under FSDP);
- activations: what autograd keeps for backward in the context encoder and the predictor (the target
  encoder runs without grad: one block's working set).  Per token and block: 22 D + 4 H bytes in
  bfloat16 autocast (float32 residual stream; SDPA keeps no attention matrix), 36 D + 8 H in float32;
  with checkpointing only each block's input (4 D) plus one block's full set during recompute.
`fits` adds 10 % and 2 GiB (CUDA context, allocator fragmentation) to the total.
"""

from __future__ import annotations

import statistics

import torch

from ..config import Config
from ..masks import MultiBlockMaskCollator
from ..models import build_encoder, build_predictor
from ..models.vision_transformer import VIT_SIZES

GIB = 2 ** 30
OVERHEAD_FRACTION, OVERHEAD_GIB = 0.10, 2.0


def mean_tokens(cfg: Config, batches: int = 8) -> tuple[float, float]:
    collator = MultiBlockMaskCollator(
        input_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size, enc_mask_scale=cfg.mask.enc_mask_scale,
        pred_mask_scale=cfg.mask.pred_mask_scale, aspect_ratio=cfg.mask.aspect_ratio,
        nenc=cfg.mask.num_enc_masks, npred=cfg.mask.num_pred_masks, min_keep=cfg.mask.min_keep,
        allow_overlap=cfg.mask.allow_overlap, legacy_sampler=cfg.mask.legacy_sampler, seed=cfg.meta.seed, rank=0)
    ctx, tgt = [], []
    for step in range(batches):
        masks_enc, masks_pred = collator.sample(min(cfg.data.batch_size, 64), step=step)
        ctx.append(masks_enc[0].shape[1])
        tgt.append(masks_pred[0].shape[1])
    return statistics.mean(ctx), statistics.mean(tgt)


def _models(cfg: Config, model_name: str, override_dims: bool):
    with torch.device("meta"):
        encoder = build_encoder(model_name, img_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size,
                                **({"embed_dim": cfg.meta.embed_dim, "depth": cfg.meta.depth,
                                    "num_heads": cfg.meta.num_heads} if override_dims else {}))
        predictor = build_predictor(encoder, pred_depth=cfg.meta.pred_depth, pred_emb_dim=cfg.meta.pred_emb_dim)
    return encoder, predictor


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_activation_bytes(tokens: float, width: int, hidden: int, dtype: str, checkpointing: bool) -> float:
    full = (22 * width + 4 * hidden) if dtype != "float32" else (36 * width + 8 * hidden)
    return tokens * (4 * width if checkpointing else full)


def estimate(cfg: Config, model_name: str, gpus: int, k_ctx: float, k_tgt: float, override_dims: bool = False) -> dict:
    """Memory per GPU (bytes) by component and mode for one encoder size."""
    encoder, predictor = _models(cfg, model_name, override_dims)
    p_enc, p_pred = _count(encoder), _count(predictor)
    width, depth = encoder.embed_dim, len(encoder.blocks)
    hidden = encoder.blocks[0].mlp.fc1.out_features
    p_width, p_depth = cfg.meta.pred_emb_dim, cfg.meta.pred_depth
    dtype = cfg.distributed.dtype
    compute_bytes = 2 if dtype != "float32" else 4
    batch, nenc, npred = cfg.data.batch_size, cfg.mask.num_enc_masks, cfg.mask.num_pred_masks
    ctx_tokens = batch * nenc * k_ctx
    pred_tokens = batch * nenc * npred * (k_ctx + k_tgt)
    target_tokens = batch * encoder.num_patches
    block_params = max(_count(encoder.blocks[0]) if depth else 0, _count(predictor.predictor_blocks[0]))

    out = {"params": p_enc + p_pred, "params_encoder": p_enc, "params_predictor": p_pred}
    for mode in ("ddp", "fsdp"):
        shards = gpus if mode == "fsdp" else 1
        weights = 4 * (2 * p_enc + p_pred) / shards
        if mode == "fsdp" or dtype != "float32":
            weights += 2 * block_params * compute_bytes  # gathered / cast copies of the blocks in flight
        grads = 4 * (p_enc + p_pred) / shards
        optimizer = 8 * (p_enc + p_pred) / shards
        for checkpointing in (False, True):
            enc_act = depth * block_activation_bytes(ctx_tokens, width, hidden, dtype, checkpointing)
            pred_act = p_depth * block_activation_bytes(pred_tokens, p_width, 4 * p_width, dtype, checkpointing)
            if checkpointing:  # one block recomputed at a time
                enc_act += block_activation_bytes(ctx_tokens, width, hidden, dtype, False)
                pred_act += block_activation_bytes(pred_tokens, p_width, 4 * p_width, dtype, False)
            # Target encoder (no grad): its working set and the layer-normed targets.
            target_act = target_tokens * (4 * width + 2 * hidden * compute_bytes / 2) + \
                batch * npred * k_tgt * width * 4
            activations = enc_act + pred_act + target_act
            total = weights + grads + optimizer + activations
            key = f"{mode}{'_ac' if checkpointing else ''}"
            out[key] = {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations,
                        "total": total, "fits": total * (1 + OVERHEAD_FRACTION) + OVERHEAD_GIB * GIB}
    return out


def table(cfg: Config, gpus: int, gpu_mem_gib: float, sizes=None, unit: str = "GiB") -> str:
    scale = GIB if unit == "GiB" else 2 ** 20
    k_ctx, k_tgt = mean_tokens(cfg)
    # "config": the config's own encoder (meta.embed_dim/depth/num_heads applied), then the named sizes.
    names = ["config"] + list(sizes or VIT_SIZES)
    header = (f"plan: {cfg.data.crop_size} px / patch {cfg.mask.patch_size}, batch {cfg.data.batch_size} per GPU, "
              f"{cfg.distributed.dtype}, predictor {cfg.meta.pred_emb_dim} x {cfg.meta.pred_depth}, "
              f"{gpus} GPUs of {gpu_mem_gib:g} GiB; mean context {k_ctx:.0f} / target {k_tgt:.0f} tokens "
              f"(x {cfg.mask.num_pred_masks} targets)")
    cols = ["model", "params M", "weights", "grads", "optim", "act", "act+AC", "DDP", "DDP+AC", "FSDP", "FSDP+AC"]
    rows = [cols]
    for name in names:
        if name == "config":
            e = estimate(cfg, cfg.meta.model_name, gpus, k_ctx, k_tgt, override_dims=True)
            label = f"config ({cfg.meta.model_name})"
        else:
            e, label = estimate(cfg, name, gpus, k_ctx, k_tgt), name
        cells = [label, f"{e['params'] / 1e6:.1f}"]
        for part in ("weights", "grads", "optimizer"):
            cells.append(f"{e['ddp'][part] / scale:.1f}/{e['fsdp'][part] / scale:.2f}")
        cells += [f"{e['ddp']['activations'] / scale:.1f}", f"{e['ddp_ac']['activations'] / scale:.1f}"]
        for key in ("ddp", "ddp_ac", "fsdp", "fsdp_ac"):
            fits = e[key]["fits"] <= gpu_mem_gib * GIB
            cells.append(f"{e[key]['total'] / scale:.1f} {'ok' if fits else 'NO'}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [header, f"({unit} per GPU; weights/grads/optim as DDP/FSDP; totals before the 10 % + 2 GiB margin "
                     "that `ok` includes)"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)

