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

The time side (`--imgs-per-s-per-gpu`, `--from-bench`, `--tflops-per-gpu`): from a step rate per GPU, the
wall time of an epoch and of the run on `--gpus` GPUs, and the loader cores per GPU that keep up at a per-core
decode rate (`--data-rate-per-core`, `--from-bench-data`).  Checkpointing, evaluation and start-up are not
counted.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from ..config import Config
from ..errors import UserError
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



# ------------------------------------------------------------------------------------------ time
IN1K_TRAIN_IMAGES = 1_281_167


def time_plan(cfg: Config, gpus: int, imgs_per_s_per_gpu: float, images_per_epoch: int,
              data_rate_per_core: float | None = None) -> dict:
    """Wall time of one epoch and of `optimization.epochs` epochs on `gpus` GPUs that each train
    `imgs_per_s_per_gpu`; every rank drops its last partial batch, as the loader does."""
    batch = cfg.data.batch_size * cfg.distributed.accum_steps
    steps = images_per_epoch // (batch * gpus)
    if steps < 1:
        raise UserError(f"{images_per_epoch} images per epoch fill no step of {batch} images on {gpus} GPUs: "
                        f"lower --gpus or data.batch_size")
    epoch_s = steps * batch / imgs_per_s_per_gpu
    out = {"gpus": gpus, "imgs_per_s_per_gpu": imgs_per_s_per_gpu, "images_per_epoch": images_per_epoch,
           "steps_per_epoch": steps, "epoch_s": epoch_s, "epochs": cfg.optimization.epochs,
           "run_s": epoch_s * cfg.optimization.epochs, "gpu_hours": epoch_s * cfg.optimization.epochs * gpus / 3600}
    if data_rate_per_core:
        out["data_rate_per_core"] = data_rate_per_core
        out["cores_per_gpu"] = cores_needed(imgs_per_s_per_gpu, data_rate_per_core)
    return out


def cores_needed(imgs_per_s: float, rate_per_core: float) -> float:
    """Loader cores (images per CPU-second each) that feed `imgs_per_s`."""
    return imgs_per_s / rate_per_core


def step_rate_from_tflops(cfg: Config, tflops_per_gpu: float) -> float:
    """Images/s per GPU at a sustained model-FLOP rate, with the config's mean mask token counts."""
    from .step import step_flops

    k_ctx, k_tgt = mean_tokens(cfg)
    encoder, _ = _models(cfg, cfg.meta.model_name, override_dims=True)
    per_image = step_flops(cfg, k_ctx, k_tgt, encoder=encoder) / cfg.data.batch_size
    return tflops_per_gpu * 1e12 / per_image


def read_json_output(path: str, what: str) -> dict:
    """The last JSON object line of a file: a --json file, or a command's saved stdout."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read {what} output ({exc.__class__.__name__})") from None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    raise UserError(f"{path}: no JSON line of {what} in it; save one with `ijepa-scale {what} ... --json FILE`"
                    if what == "bench-step" else
                    f"{path}: no JSON line of {what} in it; save its output with `ijepa-scale {what} ... > FILE`")


def rate_from_bench_step(path: str, cfg: Config) -> tuple[float, str]:
    """Images/s per GPU from bench-step's --json file, and a note when it measured other settings."""
    result = read_json_output(path, "bench-step")
    if "images_per_s" not in result:
        raise UserError(f"{path}: not bench-step output (no images_per_s); use `ijepa-scale bench-step ... "
                        f"--json FILE`")
    measured = result.get("settings", {})
    ours = settings_of(cfg)
    differ = [f"{k} {measured[k]} (plan: {ours[k]})" for k in ours if k in measured and measured[k] != ours[k]]
    note = f"; measured with other settings: {', '.join(differ)}" if differ else ""
    return float(result["images_per_s"]), note


def rate_from_bench_data(path: str) -> float:
    """Images per CPU-second of the whole pipeline at the most workers bench-data timed."""
    summary = read_json_output(path, "bench-data")
    rows = [r for r in summary.get("results", []) if r.get("pipeline_img_per_cpu_s")]
    if not rows:
        raise UserError(f"{path}: no bench-data row with a per-core rate (pipeline_img_per_cpu_s)")
    return float(max(rows, key=lambda r: r["workers"])["pipeline_img_per_cpu_s"])


def settings_of(cfg: Config) -> dict:
    """The settings a step rate depends on, as bench-step records them."""
    return {"model": cfg.meta.model_name, "crop": cfg.data.crop_size, "patch": cfg.mask.patch_size,
            "batch": cfg.data.batch_size, "dtype": cfg.distributed.dtype, "parallel": cfg.distributed.parallel,
            "activation_checkpointing": cfg.distributed.activation_checkpointing,
            "compile": cfg.distributed.compile}


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_time_plan(t: dict, rate_source: str, data_source: str = "") -> str:
    lines = [f"time: {t['imgs_per_s_per_gpu']:.1f} img/s per GPU ({rate_source}) x {t['gpus']} GPUs, "
             f"{t['images_per_epoch']:,} images per epoch = {t['steps_per_epoch']:,} steps",
             f"  epoch {_duration(t['epoch_s'])}, {t['epochs']} epochs {_duration(t['run_s'])} "
             f"({t['gpu_hours']:,.0f} GPU-hours; checkpoints, evaluation and start-up not counted)"]
    if "cores_per_gpu" in t:
        lines.append(f"  data: {t['cores_per_gpu']:.2f} loader cores per GPU keep up at "
                     f"{t['data_rate_per_core']:.0f} img/s per core ({data_source}); "
                     f"{math.ceil(t['cores_per_gpu'] * t['gpus'])} cores for all {t['gpus']} GPUs")
    else:
        lines.append("  data: give --data-rate-per-core or --from-bench-data for the loader cores per GPU")
    return "\n".join(lines)
