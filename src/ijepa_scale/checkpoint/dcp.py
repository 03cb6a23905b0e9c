"""DCP (torch.distributed.checkpoint) checkpoint folders: their layout, reading them in one process,
and turning one into the single-file layout.

A folder `{stem}.dcp/` holds every rank's shard files and `.metadata` (DCP's own), `trainer.pt` (the
trainer's progress, written by rank 0) and, once all of that is written, the `COMMITTED` marker.
Tensors sit under `model` (the trained networks by name: "encoder.*", "student.*"), one entry per EMA
network, and `opt` (get_state_dict's layout, keyed by parameter name).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import safe_load
from ..errors import UserError

DCP_SUFFIX = ".dcp"
COMMIT_MARKER = "COMMITTED"
TRAINER_STATE = "trainer.pt"


def is_dcp_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def is_committed(path: str | Path) -> bool:
    return (Path(path) / COMMIT_MARKER).is_file()


def optimizer_state_to_ids(fqn_state: dict) -> dict:
    """A get_state_dict optimizer state (keyed by parameter name) in torch.optim's own layout (keyed by
    the parameter's position over all groups, which is how Optimizer.state_dict numbers them)."""
    ids: dict[str, int] = {}
    groups = []
    for group in fqn_state["param_groups"]:
        numbered = []
        for name in group["params"]:
            ids[name] = len(ids)
            numbered.append(ids[name])
        groups.append({**group, "params": numbered})
    return {"state": {ids[name]: value for name, value in fqn_state["state"].items()}, "param_groups": groups}


def optimizer_state_to_fqns(id_state: dict, names_per_group: list[list[str]]) -> dict:
    """The inverse of optimizer_state_to_ids, for parameter names listed group by group."""
    names = [name for group in names_per_group for name in group]
    groups = [{**group, "params": list(group_names)}
              for group, group_names in zip(id_state["param_groups"], names_per_group)]
    return {"state": {names[int(i)]: value for i, value in id_state["state"].items()}, "param_groups": groups}


def read_dcp(path: str | Path) -> dict:
    """Every tensor and object of a DCP folder, in one process, as the nested dict that was saved."""
    return safe_load.read_dcp(path)


def dcp_tensor_shapes(path: str | Path) -> dict[str, torch.Size]:
    """The global shape of every tensor in a DCP folder, by flattened key (from .metadata, no data read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = safe_load.read_dcp_metadata(path)
    return {key: item.size for key, item in metadata.state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}


def consolidate(path: str | Path) -> dict:
    """A committed DCP checkpoint folder as the single-file checkpoint dict (the layout of a
    `{tag}-latest.pth.tar`: `module.`-prefixed encoder / predictor / target_encoder, torch.optim's
    `opt`, and the trainer's progress fields), in this process, without a process group."""
    path = Path(path).resolve()
    if not is_dcp_checkpoint(path):
        raise UserError(f"{path} is not a checkpoint folder (no .metadata): pass a checkpoint file or a "
                        f"*{DCP_SUFFIX} checkpoint folder")
    if not is_committed(path):
        raise UserError(f"{path} has no {COMMIT_MARKER} marker: its save did not finish; use an older checkpoint")
    tensors = read_dcp(path)
    state = safe_load.load(path / TRAINER_STATE)
    model = tensors["model"]
    # Trained networks live under "model" by name ("encoder.*", "student.*"); each EMA network
    # (target_encoder) is an entry of its own.
    for key in dict.fromkeys(k.split(".", 1)[0] for k in model):
        prefix = key + "."
        state[key] = {"module." + k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
    for key, value in tensors.items():
        if key not in ("model", "opt"):
            state[key] = {"module." + k: v for k, v in value.items()}
    state["opt"] = optimizer_state_to_ids(tensors["opt"])
    return state
