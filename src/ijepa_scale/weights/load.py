"""Load checkpoints (official, ijepa-scale, Hugging Face; local, URL or registry name) into
:mod:`ijepa_scale.models`, with the architecture inferred from the weights, so no config file is needed::

    from ijepa_scale.weights import load_encoder
    enc = load_encoder("ijepa_vith14_1k")

``target_encoder`` (the EMA encoder, what the paper evaluates) is the default; pass ``key="encoder"``
for the context encoder. To take both encoders and the predictor from one large file without reading
it several times, call :func:`load_checkpoint` once and pass the resulting dict as ``source``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import safe_load
from ..models.vision_transformer import VIT_SIZES, VisionTransformer, VisionTransformerPredictor
from .download import fetch
from .hf import HFStateDict, is_hf_source, read_hf
from .official import infer_encoder_config, infer_predictor_config, select_state_dict
from .registry import is_url


def load_checkpoint(
    source: str | os.PathLike,
    map_location: Any = "cpu",
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> dict:
    """Read a checkpoint from a local path, URL or registry name (see :func:`~ijepa_scale.weights.download.fetch`
    for caching); a sharded checkpoint folder (`*.dcp`, from distributed.parallel=fsdp) is consolidated into the
    single-file layout, a run folder gives its latest checkpoint, a Hugging Face folder or .safetensors file
    its encoder (an :class:`~ijepa_scale.weights.hf.HFStateDict`).

    Files are read as tensors and plain Python values only (:mod:`ijepa_scale.checkpoint.safe_load`), which
    is everything official and ijepa-scale checkpoints hold; a file whose pickle asks to run code
    is refused with :class:`~ijepa_scale.checkpoint.safe_load.UnsafeCheckpointError`, never unpickled fully.
    """
    from ..checkpoint.dcp import consolidate, is_dcp_checkpoint
    from ..checkpoint.files import run_folder_latest

    local = Path(os.fspath(source)).expanduser()
    if not is_url(os.fspath(source)) and is_dcp_checkpoint(local):
        return consolidate(local)  # a sharded (distributed.parallel=fsdp) checkpoint folder
    path = fetch(source, cache_dir=cache_dir, sha256=sha256)
    if is_hf_source(path):
        return read_hf(path)
    if path.is_dir():
        latest = run_folder_latest(path)
        if len(latest) != 1:
            raise FileNotFoundError(f"{path} is a folder but neither a Hugging Face model (config.json + "
                                    f"model.safetensors), a sharded checkpoint folder, nor a run folder with "
                                    f"one *-latest.pth.tar or *-latest.dcp")
        if is_dcp_checkpoint(latest[0]):
            return consolidate(latest[0])
        path = latest[0]
    return safe_load.load(path, map_location=map_location)


def num_heads_of(checkpoint: Mapping[str, Any]) -> Optional[int]:
    """The head count a checkpoint records (Hugging Face config or our config), if any."""
    if isinstance(checkpoint, HFStateDict):
        return checkpoint.config.get("num_attention_heads")
    meta = (checkpoint.get("config") or {}).get("meta") if isinstance(checkpoint.get("config"), Mapping) else None
    if isinstance(meta, Mapping):
        if meta.get("num_heads"):
            return int(meta["num_heads"])
        return VIT_SIZES.get(meta.get("model_name"), {}).get("num_heads")
    return None


def encoder_for(state_dict: Mapping[str, Any], num_heads: int | None = None) -> VisionTransformer:
    """A randomly initialised ViT encoder shaped like the prefix-free encoder weights ``state_dict``."""
    cfg = infer_encoder_config(state_dict, num_heads=num_heads)
    return VisionTransformer(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        in_chans=state_dict["patch_embed.proj.weight"].shape[1],
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict or cfg["depth"] == 0,
    )


def _checkpoint_from(source, cache_dir, sha256) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    return load_checkpoint(source, map_location="cpu", cache_dir=cache_dir, sha256=sha256)


def _materialise(model_fn, state_dict, dtype: torch.dtype, device) -> torch.nn.Module:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            raise ValueError(f"{name} has non-float dtype {value.dtype}")
    # Build without running the random init, then allocate and copy the weights in.
    with torch.device("meta"):
        model = model_fn()
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_encoder(
    source: str | os.PathLike | Mapping[str, Any],
    key: str = "target_encoder",
    num_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> VisionTransformer:
    """Load an encoder (eval mode) with its architecture inferred from the weights.

    ``source``: registry name (``ijepa-scale download --list``), URL, local official ``.pth.tar``,
    our checkpoint or run folder, a Hugging Face I-JEPA directory (``config.json`` +
    ``model.safetensors``) or ``.safetensors`` file, an already loaded checkpoint dict, or a bare
    encoder state dict. A Hugging Face source holds one encoder, so ``key`` is ignored for it (the
    published facebook/ijepa_* ports hold the context encoder). ``key``: ``"target_encoder"`` (EMA encoder, default) or
    ``"encoder"`` (context encoder). ``num_heads`` is only needed for widths outside the
    official size table.
    Weights stored in any float dtype are cast to ``dtype``; loading is strict.
    """
    checkpoint = _checkpoint_from(source, cache_dir, sha256)
    state_dict = select_state_dict(checkpoint, key, "patch_embed.proj.weight")
    heads = num_heads or num_heads_of(checkpoint)
    return _materialise(lambda: encoder_for(state_dict, heads), state_dict, dtype, device)


def load_predictor(
    source: str | os.PathLike | Mapping[str, Any],
    key: str = "predictor",
    num_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> VisionTransformerPredictor:
    """Load the predictor (eval mode) with its architecture inferred from the weights."""
    checkpoint = _checkpoint_from(source, cache_dir, sha256)
    state_dict = select_state_dict(checkpoint, key, "predictor_embed.weight")
    cfg = infer_predictor_config(state_dict, num_heads=num_heads or num_heads_of(checkpoint))
    qkv_bias = "predictor_blocks.0.attn.qkv.bias" in state_dict or cfg["depth"] == 0
    return _materialise(
        lambda: VisionTransformerPredictor(**cfg, qkv_bias=qkv_bias), state_dict, dtype, device
    )


def load_pretrained(
    source: str | os.PathLike | Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    num_heads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> dict[str, torch.nn.Module]:
    """All networks a source holds, read once: ``{"encoder", "target_encoder", "predictor"}``.

    A Hugging Face source holds one encoder: it is returned as ``encoder`` only.
    """
    checkpoint = _checkpoint_from(source, cache_dir, sha256)
    common = dict(num_heads=num_heads, dtype=dtype, device=device)
    if isinstance(checkpoint, HFStateDict):
        return {"encoder": load_encoder(checkpoint, **common)}
    nets = {}
    for key in ("encoder", "target_encoder"):
        if isinstance(checkpoint.get(key), Mapping):
            nets[key] = load_encoder(checkpoint, key=key, **common)
    if isinstance(checkpoint.get("predictor"), Mapping):
        nets["predictor"] = load_predictor(checkpoint, **common)
    if not nets:
        nets["encoder"] = load_encoder(checkpoint, **common)  # a bare encoder state dict
    return nets
