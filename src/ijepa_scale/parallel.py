"""The one place where models are wrapped for data parallelism and mixed precision.

Models stay plain single-device modules; this module decides how they are
replicated (DDP today; FSDP2 will plug in here) and which autocast dtype and
gradient scaler a run uses.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def wrap_data_parallel(module: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """Replicate a trainable module across ranks (identity for one rank)."""
    module.to(device)
    if world_size <= 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


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
