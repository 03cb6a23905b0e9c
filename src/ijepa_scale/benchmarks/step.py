"""Time the training step of a config, phase by phase, and optionally an official-style step beside it.

    ijepa-scale bench-step --fname configs/demo_fmnist_vit_tiny.yaml data.batch_size=32 --vs-official

Prints images/s, ms per step split into target forward / context forward / predictor (with the loss
and collapse metrics) / backward / optimizer (grad norm, step, zero_grad) / EMA, peak memory, and the
model FLOPs utilisation against a matmul rate measured on the same device in the same run, and the dtype
split of three more steps run under torch.profiler (op time in the low-precision dtype, float32 and casts).
`--vs-official` also times, interleaved with ours on the same images, masks and sizes, a plain eager
step written from the official train.py (explicit softmax attention, AdamW's default implementation,
a GradScaler under bfloat16, a Python loop for the EMA, the loss read back every step) and prints the
ratio.  `--vs-base` times the YAML without the command-line overrides the same way (e.g. the energy
transformer against the YAML's ViT; peak memory then counts both models).  One rank, no data loading: this
measures the model step only.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Config
from ..masks import MultiBlockMaskCollator
from ..models import build_encoder, build_predictor
from ..models.utils import apply_masks, repeat_interleave_batch
from ..objectives.ijepa import collapse_metrics
from ..distributed.parallel import DTYPES, ParallelPlan, autocast_context, ema_update_, grad_norm_and_clip_, parallelize

PHASES = ("target_fwd", "context_fwd", "predictor", "backward", "optimizer", "ema")


# ------------------------------------------------------------------------------------------ FLOPs
def transformer_flops(tokens: int, width: int, hidden: int, depth: int, batch: int) -> float:
    """Forward FLOPs (2 per multiply-add) of `depth` pre-norm blocks on `batch` sequences of `tokens`."""
    per_token = 2 * (3 * width * width + width * width + 2 * width * hidden)
    attention = 2 * 2 * tokens * width  # q @ k^T and attn @ v
    return depth * batch * tokens * (per_token + attention)


def energy_flops(tokens: int, width: int, heads: int, head_dim: int, hidden: int, steps: int, batch: int) -> float:
    """Forward FLOPs of `steps` energy-descent iterations: each computes queries, keys, scores and the
    Hopfield projection, then dE/dg (scores times keys and queries, back-projection, memories)."""
    qk = heads * head_dim
    per_step = 8 * tokens * width * qk + 6 * tokens * tokens * qk + 4 * tokens * width * hidden
    return steps * batch * per_step


def step_flops(cfg: Config, k_ctx: int, k_tgt: int, encoder=None, predictor=None) -> float:
    """Model FLOPs of one I-JEPA step: target forward, context forward + backward, predictor
    forward + backward (backward = 2 x forward), projections and patch embedding included."""
    enc = encoder or _encoder(cfg)
    if hasattr(enc, "block"):
        return _energy_step_flops(cfg, k_ctx, k_tgt, enc)
    width, depth = enc.embed_dim, len(enc.blocks)
    hidden = enc.blocks[0].mlp.fc1.out_features if depth else 4 * width
    pred_width, pred_depth = cfg.meta.pred_emb_dim, cfg.meta.pred_depth
    batch, patches = cfg.data.batch_size, enc.num_patches
    nenc, npred = cfg.mask.num_enc_masks, cfg.mask.num_pred_masks
    patch_in = 3 * cfg.mask.patch_size ** 2
    target = transformer_flops(patches, width, hidden, depth, batch) + 2 * batch * patches * patch_in * width
    context = transformer_flops(k_ctx, width, hidden, depth, batch * nenc) + 2 * batch * patches * patch_in * width
    pred_tokens = k_ctx + k_tgt
    pred = (transformer_flops(pred_tokens, pred_width, 4 * pred_width, pred_depth, batch * nenc * npred)
            + 2 * batch * nenc * k_ctx * width * pred_width + 2 * batch * nenc * npred * k_tgt * pred_width * width)
    return target + 3 * (context + pred)


def _energy_step_flops(cfg: Config, k_ctx: int, k_tgt: int, enc) -> float:
    # Counted like the ViT (backward = 2 x forward); with energy.gradient=autograd the backward
    # differentiates the gradient (second order) and really costs more.
    width, block, e = enc.embed_dim, enc.block, cfg.energy
    heads, head_dim = block.wq.shape[0], block.wq.shape[1]
    pred_width = cfg.meta.pred_emb_dim
    pred_head_dim = e.head_dim or pred_width // heads
    pred_hidden = e.pred_hidden_dim or 8 * pred_width
    batch, patches = cfg.data.batch_size, enc.num_patches
    nenc, npred = cfg.mask.num_enc_masks, cfg.mask.num_pred_masks
    embed = 2 * batch * patches * 3 * cfg.mask.patch_size ** 2 * width
    target = energy_flops(patches, width, heads, head_dim, block.memories.shape[1], enc.steps, batch) + embed
    context = energy_flops(k_ctx, width, heads, head_dim, block.memories.shape[1], enc.steps, batch * nenc) + embed
    pred = (energy_flops(k_ctx + k_tgt, pred_width, heads, pred_head_dim, pred_hidden, e.pred_steps or e.steps,
                         batch * nenc * npred)
            + 2 * batch * nenc * k_ctx * width * pred_width + 2 * batch * nenc * npred * k_tgt * pred_width * width)
    return target + 3 * (context + pred)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 1.0) -> float:
    """The best rate of square matmuls in `dtype` on `device` (FLOP/s) over about `seconds`; on CUDA 8192 wide,
    as 1024-wide ones finish in microseconds there and measure the kernel launch."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * size ** 3 / (time.perf_counter() - start))
    return best


# ------------------------------------------------------------------------------------------ steps
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _encoder(cfg: Config):
    return build_encoder(cfg.meta.model_name, img_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size,
                         embed_dim=cfg.meta.embed_dim, depth=cfg.meta.depth, num_heads=cfg.meta.num_heads,
                         energy=cfg.energy)


@dataclass
class Models:
    encoder: torch.nn.Module
    predictor: torch.nn.Module
    target: torch.nn.Module
    optimizer: torch.optim.Optimizer


def build_models(cfg: Config, device: torch.device, official: bool = False, wrap_alone: bool = False) -> Models:
    from ..training.optim import make_optimizer, official_param_groups

    torch.manual_seed(cfg.meta.seed)
    encoder = _encoder(cfg)
    predictor = build_predictor(encoder, pred_depth=cfg.meta.pred_depth, pred_emb_dim=cfg.meta.pred_emb_dim,
                                energy=cfg.energy)
    target = copy.deepcopy(encoder)
    for p in target.parameters():
        p.requires_grad_(False)
    if official:
        for module in (encoder, predictor, target):
            for block in list(getattr(module, "blocks", [])) + list(getattr(module, "predictor_blocks", [])):
                block.attn.forward = _explicit_attention(block.attn)
        encoder, predictor, target = (m.to(device) for m in (encoder, predictor, target))
        optimizer = torch.optim.AdamW(official_param_groups(encoder, predictor))
    else:
        plan = ParallelPlan.from_config(cfg.distributed)
        encoder = parallelize(encoder, device, plan, wrap_alone=wrap_alone)
        predictor = parallelize(predictor, device, plan, wrap_alone=wrap_alone)
        target = parallelize(target, device, plan, trainable=False, wrap_alone=wrap_alone)
        optimizer = make_optimizer(encoder, predictor)
    for group in optimizer.param_groups:
        group["lr"] = cfg.optimization.lr
        if not group.get("WD_exclude"):
            group["weight_decay"] = cfg.optimization.weight_decay
    return Models(encoder, predictor, target, optimizer)


def _explicit_attention(attn):
    """The official attention: materialised softmax(q k^T * scale) @ v."""

    def forward(x):
        batch, tokens, dim = x.shape
        qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = ((q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5).softmax(dim=-1)
        return attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))

    return forward


def our_step(models: Models, images, masks_enc, masks_pred, cfg: Config, device, momentum: float,
             times: dict) -> None:
    """The trainer's step (objective, clipping, optimizer, EMA), timed phase by phase."""
    dtype = cfg.distributed.dtype
    marks = [time.perf_counter()]

    def mark():
        _sync(device)
        marks.append(time.perf_counter())

    with autocast_context(device, dtype):
        with torch.no_grad():
            tokens = models.target(images)
            normed = F.layer_norm(tokens, (tokens.size(-1),))
            h = repeat_interleave_batch(apply_masks(normed, masks_pred), len(images), repeat=len(masks_enc))
        mark()
        z = models.encoder(images, masks_enc)
        mark()
        p = models.predictor(z, masks_enc, masks_pred)
        loss = F.smooth_l1_loss(p, h)
        collapse_metrics(p.detach(), normed, tokens.mean(dim=1))
    torch.isfinite(loss.detach()).item()
    mark()
    loss.backward()
    mark()
    params = [p for g in models.optimizer.param_groups for p in g["params"]]
    norm = grad_norm_and_clip_(params, cfg.optimization.clip_grad)
    math.isfinite(float(norm))
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)
    mark()
    ema_update_(models.target.parameters(), models.encoder.parameters(), momentum)
    mark()
    for name, a, b in zip(PHASES, marks, marks[1:]):
        times.setdefault(name, []).append((b - a) * 1000.0)


def official_step(models: Models, images, masks_enc, masks_pred, dtype_name: str, device, momentum: float,
                  scaler) -> float:
    """One step as the official train.py does it."""
    use_bf16 = dtype_name == "bfloat16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        with torch.no_grad():
            h = models.target(images)
            h = F.layer_norm(h, (h.size(-1),))
            h = repeat_interleave_batch(apply_masks(h, masks_pred), len(images), repeat=len(masks_enc))
        z = models.predictor(models.encoder(images, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
    if use_bf16:
        scaler.scale(loss).backward()
        scaler.step(models.optimizer)
        scaler.update()
    else:
        loss.backward()
        models.optimizer.step()
    models.optimizer.zero_grad()
    with torch.no_grad():
        for q, k in zip(models.encoder.parameters(), models.target.parameters()):
            k.data.mul_(momentum).add_((1.0 - momentum) * q.detach().data)
    return float(loss.detach())


# ------------------------------------------------------------------------------------------ dtype split
LOW_PRECISION_DTYPES = ("c10::BFloat16", "c10::Half")
FLOAT_DTYPES = ("float", "double")


def dtype_split(run_step, device: torch.device, steps: int = 3) -> dict:
    """Run `run_step` `steps` times, each under torch.profiler, and split the self time of its aten ops (on CUDA:
    of their kernels) by the dtype they compute in: "low" (any bfloat16/float16 input), "float32" (float inputs
    only), "cast" (a copy between a low-precision dtype and float32/64) and "other" (integer, index and
    allocation ops).  Also: the number of casts, the share of the FLOPs torch counts (matmuls, convolutions)
    done in low precision, and the ms of the largest float32 ops by name.  Each value is the median over the
    steps, so a step slowed by other processes on a shared machine does not skew it."""
    profiled = [_profile_by_dtype(run_step, device) for _ in range(steps)]
    ms = {kind: statistics.median(p["ms"][kind] for p in profiled) for kind in profiled[0]["ms"]}
    total = sum(ms.values()) or 1.0
    names = {name for p in profiled for name in p["float32_ms"]}
    float32_ms = {name: statistics.median(p["float32_ms"].get(name, 0.0) for p in profiled) for name in names}
    return {"share": {kind: value / total for kind, value in ms.items()}, "ms": ms,
            "casts": int(statistics.median(p["casts"] for p in profiled)),
            "low_flop_share": statistics.median(p["low_flop_share"] for p in profiled),
            "float32_top_ms": dict(sorted(float32_ms.items(), key=lambda item: -item[1])[:3])}


def _profile_by_dtype(run_step, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
        run_step()
        _sync(device)
    ms = {"low": 0.0, "float32": 0.0, "cast": 0.0, "other": 0.0}
    casts, low_flops, all_flops = 0, 0, 0
    float32_ms: dict[str, float] = {}
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        floats = [d for d in (event.input_dtypes or []) if d in LOW_PRECISION_DTYPES + FLOAT_DTYPES]
        if event.name == "aten::copy_" and sum(d in LOW_PRECISION_DTYPES for d in floats[:2]) == 1:
            kind = "cast"
            casts += 1
        elif any(d in LOW_PRECISION_DTYPES for d in floats):
            kind = "low"
        else:
            kind = "float32" if floats else "other"
        event_ms = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3
        ms[kind] += event_ms
        if kind == "float32":
            name = event.name.removeprefix("aten::")
            float32_ms[name] = float32_ms.get(name, 0.0) + event_ms
        if event.flops:
            all_flops += event.flops
            low_flops += event.flops if kind == "low" else 0
    return {"ms": ms, "casts": casts, "low_flop_share": low_flops / all_flops if all_flops else 0.0,
            "float32_ms": float32_ms}


# ------------------------------------------------------------------------------------------ run
def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (0 without compile)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _warm_libraries(device: torch.device, cfg: Config) -> None:
    """One small forward and backward of the same kinds of ops (conv, linear, SDPA, norm) in the run's dtype."""
    small = build_encoder("vit_tiny", img_size=cfg.mask.patch_size * 2, patch_size=cfg.mask.patch_size, embed_dim=48,
                          depth=1, num_heads=3).to(device)
    with autocast_context(device, cfg.distributed.dtype):
        small(torch.randn(2, 3, cfg.mask.patch_size * 2, cfg.mask.patch_size * 2, device=device)).sum().backward()


def run(cfg: Config, device: torch.device, steps: int = 20, warmup: int = 3, vs_official: bool = False,
        out=sys.stdout, vs: Config | None = None, wrap_alone: bool = False) -> dict:
    """`vs`: a second config (same data, mask and batch settings) whose step is timed interleaved with ours,
    step by step on the same inputs, so load on a shared machine hits both alike.  `wrap_alone`: wrap the
    models as distributed.parallel says in a one-rank process group (DDP-of-one, FSDP-of-one)."""
    batch = cfg.data.batch_size
    collator = MultiBlockMaskCollator(
        input_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size, enc_mask_scale=cfg.mask.enc_mask_scale,
        pred_mask_scale=cfg.mask.pred_mask_scale, aspect_ratio=cfg.mask.aspect_ratio,
        nenc=cfg.mask.num_enc_masks, npred=cfg.mask.num_pred_masks, min_keep=cfg.mask.min_keep,
        allow_overlap=cfg.mask.allow_overlap, legacy_sampler=cfg.mask.legacy_sampler, seed=cfg.meta.seed, rank=0)
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(warmup + steps):
        images = torch.randn(batch, 3, cfg.data.crop_size, cfg.data.crop_size, generator=generator).to(device)
        masks_enc, masks_pred = collator.sample(batch, step=i)
        inputs.append((images, [m.to(device) for m in masks_enc], [m.to(device) for m in masks_pred]))
    k_ctx = statistics.mean(int(m[0].shape[1]) for _, m, _ in inputs)
    k_tgt = statistics.mean(int(m[0].shape[1]) for _, _, m in inputs)
    lengths = [(int(e[0].shape[1]), int(p[0].shape[1])) for _, e, p in inputs]
    length_changes = f"{sum(a != b for a, b in zip(lengths, lengths[1:]))}/{len(lengths) - 1}"

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        # The pre-made batches stay allocated all along; a training step holds only its own.
        before_mb = sum(t.nbytes for img, enc, pred in inputs[1:] for t in (img, *enc, *pred)) / 2 ** 20
    else:
        _warm_libraries(device, cfg)  # so the RSS baseline already holds the math libraries' own buffers
        before_mb = peak_memory_mb(device)  # made after the batches, so they are not counted either
    ours = build_models(cfg, device, wrap_alone=wrap_alone)
    official = build_models(cfg, device, official=True) if vs_official else None
    other = build_models(vs, device, wrap_alone=wrap_alone) if vs is not None else None
    other_times: dict[str, list[float]] = {}
    other_ms: list[float] = []
    scaler = torch.amp.GradScaler(device.type) if cfg.distributed.dtype == "bfloat16" else None
    momentum = cfg.optimization.ema[0]
    times: dict[str, list[float]] = {}
    ours_ms, official_ms, first_ms = [], [], None
    compiled_at: list[tuple[int, int, float]] = []  # (step, graphs compiled in it, its ms)
    for i, (images, masks_enc, masks_pred) in enumerate(inputs):
        graphs_before = _compiled_graphs()
        start = time.perf_counter()
        step_times: dict[str, list[float]] = {}
        our_step(ours, images, masks_enc, masks_pred, cfg, device, momentum, step_times)
        elapsed = (time.perf_counter() - start) * 1000.0
        compiled = _compiled_graphs() - graphs_before
        if compiled:
            compiled_at.append((i + 1, compiled, elapsed))
        first_ms = elapsed if first_ms is None else first_ms
        if i >= warmup:
            ours_ms.append(elapsed)
            for name, values in step_times.items():
                times.setdefault(name, []).extend(values)
        if official is not None:
            start = time.perf_counter()
            official_step(official, images, masks_enc, masks_pred, cfg.distributed.dtype, device, momentum, scaler)
            _sync(device)
            if i >= warmup:
                official_ms.append((time.perf_counter() - start) * 1000.0)
        if other is not None:
            start = time.perf_counter()
            step_times = {}
            our_step(other, images, masks_enc, masks_pred, vs, device, momentum, step_times)
            if i >= warmup:
                other_ms.append((time.perf_counter() - start) * 1000.0)
                for name, values in step_times.items():
                    other_times.setdefault(name, []).extend(values)
    peak_mb = peak_memory_mb(device) - before_mb
    images, masks_enc, masks_pred = inputs[-1]
    split = dtype_split(lambda: our_step(ours, images, masks_enc, masks_pred, cfg, device, momentum, {}), device)

    dtype = DTYPES[cfg.distributed.dtype]
    peak = matmul_peak_flops(device, dtype)
    flops = step_flops(cfg, k_ctx, k_tgt)
    step_ms = statistics.median(ours_ms)
    result = {
        "step_ms": step_ms, "images_per_s": batch / step_ms * 1000.0, "first_step_ms": first_ms,
        "phases_ms": {name: statistics.median(times[name]) for name in PHASES},
        "peak_memory_mb": peak_mb, "model_tflop_per_step": flops / 1e12,
        "matmul_peak_tflops": peak / 1e12, "mfu": flops / (step_ms / 1000.0) / peak,
        "k_ctx": k_ctx, "k_tgt": k_tgt, "compiled_at": compiled_at, "length_changes": length_changes,
        "dtype_split": split,
    }
    if official is not None:
        result["official_step_ms"] = statistics.median(official_ms)
        result["speedup_vs_official"] = result["official_step_ms"] / step_ms
    if other is not None:
        result["vs_step_ms"] = statistics.median(other_ms)
        result["vs_phases_ms"] = {name: statistics.median(other_times[name]) for name in PHASES}
        # Paired by step: both ran back to back on the same inputs.
        result["vs_ratio"] = statistics.median(a / b for a, b in zip(ours_ms, other_ms))
        result["vs_name"] = f"{vs.meta.model_name} ({_depth_text(vs)})"
    print(format_result(cfg, device, result, steps), file=out)
    return result


def _depth_text(cfg: Config) -> str:
    if cfg.meta.model_name == "energy_transformer":
        e = cfg.energy
        return f"energy steps {e.steps}/{e.pred_steps or e.steps}, gradient {e.gradient}"
    return f"depth {cfg.meta.depth or 'default'}"


def format_result(cfg: Config, device: torch.device, r: dict, steps: int) -> str:
    memory = "peak allocated" if device.type == "cuda" else "peak RSS growth"
    lines = [
        f"bench-step: {cfg.meta.model_name} (width {cfg.meta.embed_dim or 'default'}, {_depth_text(cfg)}), {cfg.data.crop_size} px / patch {cfg.mask.patch_size}, batch "
        f"{cfg.data.batch_size}, {cfg.distributed.dtype}, {device}, {torch.get_num_threads()} threads, "
        f"median of {steps} steps; context {r['k_ctx']:.1f} / target {r['k_tgt']:.1f} tokens",
        f"  step {r['step_ms']:.1f} ms  {r['images_per_s']:.1f} img/s  {memory} {r['peak_memory_mb']:.0f} MB  "
        f"(first step {r['first_step_ms']:.0f} ms{', compiling' if cfg.distributed.compile else ''})",
        "  " + "  ".join(f"{name} {ms:.1f}" for name, ms in r["phases_ms"].items()) + " (ms)",
        f"  model {r['model_tflop_per_step'] * 1e3:.2f} GFLOP/step, matmul peak {r['matmul_peak_tflops']:.3f} "
        f"TFLOP/s, MFU {100 * r['mfu']:.1f} %",
        _format_split(cfg.distributed.dtype, r["dtype_split"]),
    ]
    if cfg.distributed.compile:
        compiled = r["compiled_at"]
        lines.append(f"  compile: {sum(n for _, n, _ in compiled)} graph(s), compiled in step(s) "
                     + (", ".join(f"{step} ({n} graph(s), {ms / 1000:.1f} s)" for step, n, ms in compiled) or "none")
                     + f"; context/target lengths changed in {r['length_changes']} of the steps")
    if "vs_step_ms" in r:
        lines.append(f"  vs {r['vs_name']}, interleaved: step {r['vs_step_ms']:.1f} ms  "
                     + "  ".join(f"{name} {ms:.1f}" for name, ms in r["vs_phases_ms"].items())
                     + f" (ms) -> ours takes {r['vs_ratio']:.2f}x its time (median of per-step ratios)")
    if "official_step_ms" in r:
        lines.append(f"  official-style step {r['official_step_ms']:.1f} ms -> ours is "
                     f"{r['speedup_vs_official']:.2f}x as fast")
    return "\n".join(lines)



def _format_split(dtype_name: str, split: dict) -> str:
    share, ms = split["share"], split["ms"]
    parts = []
    if dtype_name != "float32":
        parts.append(f"{dtype_name} {100 * share['low']:.0f} %")
    parts.append(f"float32 {100 * share['float32']:.0f} %")
    if dtype_name != "float32":
        parts.append(f"casts {100 * share['cast']:.0f} % ({split['casts']} casts, {ms['cast']:.1f} ms)")
    parts.append(f"other {100 * share['other']:.0f} %")
    line = "  dtype split (op time, median of 3 profiled steps): " + " / ".join(parts)
    if dtype_name != "float32":
        line += f"; matmul/conv FLOPs in {dtype_name} {100 * split['low_flop_share']:.0f} %"
    top = ", ".join(f"{name} {value:.1f}" for name, value in split["float32_top_ms"].items())
    return line + (f"; float32 ops: {top} ms" if top else "")
