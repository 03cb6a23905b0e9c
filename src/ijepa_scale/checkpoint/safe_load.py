"""Reading checkpoint files without running code from them.

A pickle can call any function while it is read. Every file we read weights or training state from
goes through here: ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings, and the
numpy scalars and arrays and the argparse Namespace some third-party checkpoints hold), and for torch.distributed.checkpoint
(DCP) folders a reader whose `.metadata` unpickler knows DCP's own record types only and whose
non-tensor entries load with ``weights_only=True`` too (DCP's defaults unpickle both fully).
A file that needs anything else is refused with one line naming the file and what it asked for.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError


class UnsafeCheckpointError(UserError):
    """The file needs code run to be read; it is never read that way."""


def _allowed_globals() -> list:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [argparse.Namespace, np.dtype, np.ndarray]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    allowed += [type(np.dtype(name)) for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                                  "uint32", "uint64", "float16", "float32", "float64")]
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _refusal(path: Any, needs: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refusing to read {path}: it asks to run {needs}, and checkpoint files are only read as tensors and plain "
        f"Python values (reading it fully could run code from the file)")


def _unpickler_reason(err: Exception) -> str:
    # torch prefixes every refusal with advice to unpickle fully; keep only what it found.
    text = str(err)
    _, _, tail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (tail or text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load(source: str | os.PathLike | io.IOBase, *, what: str | os.PathLike | None = None, mmap: bool = False,
         map_location: Any = "cpu") -> Any:
    """`torch.load` that never runs code: a refused file raises UnsafeCheckpointError naming it (`what`)."""
    with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
        try:
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            found = _REFUSED_GLOBAL.search(str(err))
            if found:
                raise _refusal(what if what is not None else source, found.group(1)) from None
            raise pickle.UnpicklingError(f"not a readable checkpoint ({_unpickler_reason(err)})") from None


# ------------------------------------------------------------------------------------------ DCP
_DCP_METADATA_TYPES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_TYPES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not a DCP metadata type")


def read_dcp_metadata(folder: str | os.PathLike):
    """A DCP folder's `.metadata`, reading only DCP's own record types."""
    return _unpickle_metadata(Path(folder) / ".metadata")


def _unpickle_metadata(path: Path):
    with open(path, "rb") as f:
        try:
            return _DCPMetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            found = _REFUSED_GLOBAL.search(str(err))
            if found:
                raise _refusal(path, found.group(1)) from None
            raise
        except (AttributeError, EOFError, TypeError, ValueError) as err:
            raise pickle.UnpicklingError(f"{path} is not DCP metadata ({type(err).__name__}: {err})") from None


def _dcp_reader(folder: str | os.PathLike):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = _unpickle_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(os.fspath(folder))


def _load_bytes_safely(planner, read_item, value: io.BytesIO) -> None:
    # DefaultLoadPlanner.load_bytes with a safe load in place of its weights_only=False one.
    from torch.distributed.checkpoint._traverse import set_element

    obj = load(value, what=f"entry {read_item.dest_index.fqn!r} of a DCP checkpoint")
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


def _dcp_planner(into_empty: bool):
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner

    class SafeLoadPlanner(_EmptyStateDictLoadPlanner if into_empty else DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            _load_bytes_safely(self, read_item, value)

    return SafeLoadPlanner()


def _refusal_inside(exc: BaseException) -> UnsafeCheckpointError | None:
    # DCP reports a rank's error wrapped in a CheckpointException (a BaseException) with its traceback.
    for error, _trace in getattr(exc, "failures", {}).values():
        if isinstance(error, UnsafeCheckpointError):
            return error
    return None


def load_dcp(state: dict, folder: str | os.PathLike, process_group=None) -> None:
    """`torch.distributed.checkpoint.load` into `state` (every rank of `process_group` calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_dcp_metadata(folder)  # a refusal is raised here, not swallowed by DCP's fallbacks
    try:
        dcp.load(state, storage_reader=_dcp_reader(folder), planner=_dcp_planner(False), process_group=process_group)
    except CheckpointException as exc:
        raise (_refusal_inside(exc) or exc) from None


def read_dcp(folder: str | os.PathLike) -> dict:
    """Every tensor and object of a DCP folder, in one process, as the nested dict that was saved."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    read_dcp_metadata(folder)
    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=_dcp_reader(folder), planner=_dcp_planner(True), no_dist=True)
    except CheckpointException as exc:
        raise (_refusal_inside(exc) or exc) from None
    return state
