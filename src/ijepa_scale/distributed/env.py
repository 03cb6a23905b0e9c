"""Process-group setup and the few collectives the trainer needs.

Rank discovery, in order: explicit arguments from the local launcher, then the
env:// variables set by torchrun or submitit (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT).  One process with neither runs without a process
group.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..errors import UserError, one_line


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
        timeout = datetime.timedelta(seconds=timeout_s)
        store = group_store(rank, world_size, timeout) if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" \
            else None
        dist.init_process_group(
            backend=backend,
            init_method=None if store is not None else "env://",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=rank if local_rank is None else local_rank,
                   device=device)


GROUP_STORE_KEY = "ijepa_scale/group_store"


def group_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """A store of this worker group's own, under torchrun's shared store (MASTER_ADDR:MASTER_PORT).

    torchrun's agents keep one store for the whole job; after an elastic restart it still holds the previous
    worker group's gloo/NCCL addresses under the same keys, and a restarted rank may read a dead peer's
    address (`connectFullMesh ... Connection refused`). The group cannot agree on a fresh key prefix through
    that store either (any value there may be the previous group's), so rank 0 serves a new store and announces
    its port with a random token there; the other ranks take an announcement only once the store at that port
    answers with the same token, so the previous group's (a dead port, or one reused) is never mistaken for it.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    shared = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if rank == 0:
        token = secrets.token_hex(8)
        own = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        own.set("token", token)
        shared.set(GROUP_STORE_KEY, f"{own.port} {token}")
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        own_port, token = shared.get(GROUP_STORE_KEY).decode().split()
        try:
            socket.create_connection((host, int(own_port)), timeout=2).close()  # a dead port, quietly
            own = dist.TCPStore(host, int(own_port), is_master=False, timeout=datetime.timedelta(seconds=2))
            if own.get("token").decode() == token:
                own.set_timeout(timeout)
                return own
        except (OSError, RuntimeError, ValueError):
            pass  # the previous group's store (gone, or its port now someone else's): wait for rank 0's
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 announced no store of this worker group within {timeout} on {host}:{port}")
        time.sleep(0.5)


def destroy(synchronize: bool = False) -> None:
    """Leave the process group. `synchronize`: pass a barrier first, for ranks that all got here without an
    error. Without it a rank that finishes the last collective early and closes its gloo connections while
    a peer is still completing that collective can abort the peer (SIGABRT, "terminate called without an
    active exception")."""
    if not dist.is_initialized():
        return
    if synchronize and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except Exception as exc:  # the group is torn down regardless; the peer's own error says why
            logging.getLogger("ijepa_scale").warning("leaving the process group without the final barrier: %s",
                                                     one_line(exc))
    dist.destroy_process_group()


@contextlib.contextmanager
def leave_group_after():
    """Leave the process group when the block ends: through the final barrier of `destroy` when it ended
    without an error on this rank, at once when it raised (a peer may be gone)."""
    try:
        yield
    except BaseException:
        destroy()
        raise
    destroy(synchronize=True)


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
