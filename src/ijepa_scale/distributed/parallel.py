"""The one place where models are wrapped for data parallelism, mixed precision, activation
checkpointing and compilation.

Models stay plain single-device modules.  `parallelize` decides how a module is replicated
(DDP) or sharded (FSDP2: every transformer block, then the root, over a 1-D mesh of all ranks),
which blocks recompute their activations in backward, and which blocks are compiled.  The
trainer talks to the result through the few helpers below, so it never needs to know which
mode is active.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BLOCK_LISTS = ("blocks", "predictor_blocks")
SHARED_BLOCK = "block"  # the energy transformer's one block, applied energy.steps times in one call


@dataclass(frozen=True)
class ParallelPlan:
    mode: str = "ddp"  # ddp | fsdp
    dtype: str = "float32"
    activation_checkpointing: bool = False
    compile: bool = False
    target_dtype: Optional[str] = None  # the frozen (EMA) networks' forward; None = dtype

    @classmethod
    def from_config(cls, distributed) -> "ParallelPlan":
        return cls(mode=distributed.parallel, dtype=distributed.dtype,
                   activation_checkpointing=distributed.activation_checkpointing, compile=distributed.compile,
                   target_dtype=distributed.target_dtype)

    @property
    def frozen_dtype(self) -> str:
        return self.target_dtype or self.dtype


def transformer_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of `module`, also where it wraps a ViT (the gated student, a pooled ViT)."""
    blocks = []
    for sub in module.modules():
        for name in BLOCK_LISTS:
            blocks.extend(getattr(sub, name, ()))
        shared = getattr(sub, SHARED_BLOCK, None)
        if isinstance(shared, torch.nn.Module):
            blocks.append(shared)
    return blocks


def _checkpointed_forward(forward, *args, **kwargs):
    # Non-reentrant: composes with FSDP2's hooks and with autocast, and keeps the RNG state (so a
    # recomputed gated block draws the same gate noise).
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(module: torch.nn.Module) -> None:
    """Recompute each block's activations in backward; parameter names stay unchanged (an instance
    forward, not a wrapper module, so checkpoints and state dicts look the same either way)."""
    for block in transformer_blocks(module):
        block.forward = functools.partial(_checkpointed_forward, block.forward)


def _forward_in_precision(forward, device_type: str, dtype_name: str, *args, **kwargs):
    # float32 switches off the autocast that the step runs under; other dtypes replace its dtype.
    if DTYPES[dtype_name] == torch.float32:
        context = torch.autocast(device_type, enabled=False)
    else:
        context = torch.autocast(device_type, dtype=DTYPES[dtype_name])
    with context:
        return forward(*args, **kwargs)


def apply_forward_precision(module: torch.nn.Module, device: torch.device, dtype_name: str) -> None:
    """Run `module`'s forward in `dtype_name` whatever the caller's autocast (an instance forward, so the state
    dict is unchanged)."""
    module.forward = functools.partial(_forward_in_precision, module.forward, device.type, dtype_name)


def apply_compile(module: torch.nn.Module) -> None:
    """Compile each block once for all sequence lengths (context and target lengths change every batch)."""
    for block in transformer_blocks(module):
        block.compile(dynamic=True)


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def _fully_shard(module: torch.nn.Module, device: torch.device, dtype_name: str) -> torch.nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(device)
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype_name], reduce_dtype=torch.float32)
    for block in transformer_blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root holds patch/position embeddings, the final norm and the predictor's projections.
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def distributed_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def parallelize(module: torch.nn.Module, device: torch.device, plan: ParallelPlan,
                trainable: bool = True, wrap_alone: bool = False) -> torch.nn.Module:
    """Move `module` to `device` and wrap it as the plan says.

    Order as in torchtitan: activation checkpointing, then compile, then sharding, so FSDP's
    hooks sit outside the recomputed and compiled regions.  A frozen module (the target encoder)
    is sharded like a trainable one under FSDP and left plain under DDP (it needs no gradient sync).
    """
    if plan.compile and getattr(module, "gradient", None) == "autograd":
        from ..errors import UserError

        raise UserError("distributed.compile=true cannot compile the energy block's second-order gradient "
                        "(energy.gradient=autograd); set energy.gradient=analytic or distributed.compile=false")
    module.to(device)
    if plan.activation_checkpointing and trainable:
        apply_activation_checkpointing(module)
    if plan.compile:
        apply_compile(module)
    if not trainable and plan.frozen_dtype != plan.dtype:
        apply_forward_precision(module, device, plan.frozen_dtype)
    if not (distributed_active() or (wrap_alone and dist.is_initialized())):
        return module
    if plan.mode == "fsdp":
        _fully_shard(module, device, plan.dtype if trainable else plan.frozen_dtype)
        if not trainable:
            # FSDP keeps the root's parameters gathered after forward (for the backward that a frozen
            # module never has); reshard so the EMA sees the same shards as the encoder.
            module.register_forward_hook(lambda mod, args, out: mod.reshard())
        return module
    if not trainable:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(module), FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly) sharded tensor; the tensor itself when it is not a DTensor."""
    from torch.distributed.tensor import DTensor

    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank when it is a DTensor)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def ema_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * online, on local shards (no gather under FSDP)."""
    with torch.no_grad():
        target = [local(p) for p in target]
        online = [local(p) for p in online]
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)


def grad_norm_and_clip_(params: list[torch.Tensor], max_norm: Optional[float]) -> torch.Tensor:
    """Global gradient norm (over every rank's shards under FSDP) as a 0-dim tensor; clips in place."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = full(torch.nn.utils.get_total_norm(grads, foreach=True))
    if max_norm is not None:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_([local(g) for g in grads], coef)
    return norm


def no_grad_sync(modules: Iterable[torch.nn.Module], skip: bool):
    """Under DDP, skip the gradient all-reduce of an accumulation micro-batch that is not the last.
    FSDP reduce-scatters every micro-batch (sharded gradients accumulate; nothing to skip safely)."""
    if not skip:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for module in modules:
        if isinstance(module, DistributedDataParallel):
            stack.enter_context(module.no_sync())
    return stack


def autocast_context(device: torch.device, dtype_name: str):
    dtype = DTYPES[dtype_name]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype_name: str):
    """A GradScaler only for float16; bfloat16 has the float32 exponent range and needs none."""
    if dtype_name != "float16":
        return None
    return torch.amp.GradScaler(device.type)
