"""Process-group setup and the few collectives the trainer needs.

Rank discovery, in order: explicit arguments from the local launcher, then the
env:// variables set by torchrun or submitit (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT).  One process with neither runs without a process
group.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_device(name: str, flag: str = "--devices") -> torch.device:
    """`name` as a device this machine has; a UserError names `flag` (the option that gave it) otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag}: {name!r} is not a device name (use e.g. cuda:0 or cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag}: {name} requested but CUDA is not available here (use cpu)")
        if device.index is None:
            device = torch.device("cuda", 0)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"{flag}: {name} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type != "cpu":
        raise UserError(f"{flag}: unsupported device type {device.type!r} (use cuda:N or cpu)")
    return device


def env_rank_info() -> Optional[tuple[int, int, int]]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        return rank, world, local
    return None


def init_distributed(rank: int, world_size: int, device: torch.device, local_rank: int | None = None,
                     timeout_s: int = 1800) -> DistEnv:
    """Join the process group (MASTER_ADDR/MASTER_PORT must be set when world_size > 1)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=rank if local_rank is None else local_rank,
                   device=device)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def on_main_then_broadcast(is_main: bool, build):
    """Run `build()` on rank 0 only (listing, counting, downloading) and hand its result to every rank;
    an exception is raised on every rank, so none is left waiting in a collective."""
    result = None
    if is_main:
        try:
            result = build()
        except Exception as exc:
            result = exc
    result = broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return result


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
