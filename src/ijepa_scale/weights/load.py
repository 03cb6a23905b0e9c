"""Load official (and ijepa-scale) I-JEPA checkpoints into :mod:`ijepa_scale.models`.

The released files (``https://dl.fbaipublicfiles.com/ijepa/*.pth.tar``) are full training
checkpoints: a dict with ``encoder``, ``predictor`` and ``target_encoder`` state dicts (keys
prefixed with DDP's ``module.``) plus optimizer state. The architecture is inferred from the
weights, so no config file is needed::

    from ijepa_scale.weights.load import load_encoder
    enc = load_encoder("https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar")

``target_encoder`` (the EMA encoder, what the paper evaluates) is the default; pass
``key="encoder"`` for the context encoder. To take both encoders and the predictor from one
large file without reading it several times, call :func:`load_checkpoint` once and pass the
resulting dict as ``source``.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .download import CACHE_ENV_VAR, RELEASES, default_cache_dir, is_url  # noqa: F401 (re-exported)
from .download import fetch as _download_fetch
from ..checkpoint import safe_load
from ..errors import UserError
from .hf import HFStateDict, num_heads_of
from ..models.vision_transformer import (
    VIT_SIZES,
    VisionTransformer,
    VisionTransformerPredictor,
)

logger = logging.getLogger(__name__)

_STRIPPABLE_PREFIXES = ("module.", "backbone.", "_orig_mod.")

# Kept for existing callers: name -> URL of each released checkpoint (see ijepa_scale.weights.download).
OFFICIAL_CHECKPOINT_URLS = {alias: r.url for r in RELEASES for alias in (r.name,) + r.aliases}


def _is_url(source: str) -> bool:
    return is_url(source)


def fetch(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
          sha256: str | None = None) -> Path:
    """A local path for a registry name, URL or path (see :func:`ijepa_scale.weights.download.fetch`)."""
    return _download_fetch(source, cache_dir=cache_dir, sha256=sha256)


def load_checkpoint(
    source: str | os.PathLike,
    map_location: Any = "cpu",
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> dict:
    """Read a checkpoint from a local path or URL (see :func:`fetch` for caching); a sharded
    checkpoint folder (`*.dcp`, from meta.parallel=fsdp) is consolidated into the single-file layout.

    Files are read as tensors and plain Python values only (:mod:`ijepa_scale.checkpoint.safe_load`), which
    is everything official and ijepa-scale checkpoints hold; a file whose pickle asks to run code
    is refused with :class:`~ijepa_scale.checkpoint.safe_load.UnsafeCheckpointError`, never unpickled fully.
    """
    from ..checkpoint.dcp import consolidate, is_dcp_checkpoint
    from ..checkpoint.files import run_folder_latest
    from .hf import is_hf_source, read_hf

    local = Path(os.fspath(source)).expanduser()
    if not _is_url(os.fspath(source)) and is_dcp_checkpoint(local):
        return consolidate(local)  # a sharded (meta.parallel=fsdp) checkpoint folder
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


# --------------------------------------------------------------------------------------------
# State-dict helpers
# --------------------------------------------------------------------------------------------
def strip_prefixes(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Drop leading ``module.`` / ``backbone.`` (and ``_orig_mod.`` from torch.compile).

    Prefixes are removed repeatedly in any order, e.g. ``module.backbone.blocks.0...`` ->
    ``blocks.0...``. Raises ValueError if two keys collapse to the same name.
    """
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in _STRIPPABLE_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    stripped = True
        if name in out:
            raise ValueError(f"keys collide after stripping prefixes: {key!r} -> {name!r}")
        out[name] = value
    return out


def _block_indices(state_dict: Mapping[str, Any], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
    if indices != set(range(len(indices))):
        raise ValueError(f"non-contiguous block indices under {prefix!r}: {sorted(indices)}")
    return len(indices)


def _require(state_dict: Mapping[str, Any], key: str, what: str) -> torch.Tensor:
    if key not in state_dict:
        sample = ", ".join(list(state_dict)[:8])
        raise ValueError(f"not a {what} state dict: missing {key!r} (keys start with: {sample})")
    return state_dict[key]


def _heads_for(embed_dim: int, depth: int | None, num_heads: int | None, what: str) -> int:
    if num_heads is not None:
        return num_heads
    for cfg in VIT_SIZES.values():
        if cfg["embed_dim"] == embed_dim and (depth is None or cfg["depth"] == depth):
            return cfg["num_heads"]
    for cfg in VIT_SIZES.values():
        if cfg["embed_dim"] == embed_dim:
            return cfg["num_heads"]
    raise ValueError(
        f"cannot infer num_heads for a {what} with embed_dim={embed_dim}: it is not in the "
        f"official size table; pass num_heads= (--num-heads on the command line)"
    )


def _mlp_ratio(hidden: int, dim: int) -> float:
    # Blocks use int(dim * ratio); make sure that lands exactly on ``hidden``.
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        ratio = (hidden + 0.5) / dim
    return ratio


def refuse_energy_weights(state_dict: Mapping[str, Any]) -> None:
    """UserError for energy-transformer weights where only a ViT (official format, Hugging Face) can go."""
    if any(k.startswith("block.") for k in state_dict):
        raise UserError("these are energy-transformer weights (meta.model_name=energy_transformer), which the "
                        "official and Hugging Face ViT formats cannot hold; evaluate the run's checkpoint itself "
                        "with `ijepa-scale eval ... --checkpoint RUN`, which builds it from the saved config")


def infer_encoder_config(state_dict: Mapping[str, Any], num_heads: int | None = None) -> dict:
    """Infer the encoder architecture from its (possibly prefixed) state dict.

    Returns ``dict(embed_dim, depth, num_heads, patch_size, img_size, mlp_ratio, model_name)``;
    ``model_name`` is the official size name when width, depth and MLP size match one, else
    None. The weights do not determine ``num_heads``: it comes from the argument if given,
    else from the official table (by width and depth, then width alone).
    """
    sd = strip_prefixes(state_dict)
    refuse_energy_weights(sd)
    patch_w = _require(sd, "patch_embed.proj.weight", "ViT encoder")
    embed_dim, _, patch_size, patch_w2 = patch_w.shape
    if patch_size != patch_w2:
        raise ValueError(f"non-square patches are not supported: {tuple(patch_w.shape)}")
    depth = _block_indices(sd, "blocks.")
    num_patches = _require(sd, "pos_embed", "ViT encoder").shape[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} tokens, not a square grid")
    hidden = _require(sd, "blocks.0.mlp.fc1.weight", "ViT encoder").shape[0] if depth else 0
    model_name = next(
        (
            name
            for name, cfg in VIT_SIZES.items()
            if cfg["embed_dim"] == embed_dim
            and cfg["depth"] == depth
            and int(embed_dim * cfg["mlp_ratio"]) == hidden
        ),
        None,
    )
    mlp_ratio = VIT_SIZES[model_name]["mlp_ratio"] if model_name else _mlp_ratio(hidden, embed_dim)
    heads = _heads_for(embed_dim, depth, num_heads, "ViT encoder")
    if embed_dim % heads != 0:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {heads}")
    return dict(
        embed_dim=int(embed_dim),
        depth=depth,
        num_heads=int(heads),
        patch_size=int(patch_size),
        img_size=int(grid * patch_size),
        mlp_ratio=mlp_ratio,
        model_name=model_name,
    )


def infer_predictor_config(state_dict: Mapping[str, Any], num_heads: int | None = None) -> dict:
    """Infer the predictor architecture from its (possibly prefixed) state dict.

    Returns ``dict(num_patches, embed_dim, predictor_embed_dim, depth, num_heads, mlp_ratio)``.
    Heads follow the encoder as upstream: looked up in the official table by the encoder width
    (``predictor_embed.weight.shape[1]``) unless ``num_heads`` is given.
    """
    sd = strip_prefixes(state_dict)
    pred_dim, embed_dim = _require(sd, "predictor_embed.weight", "predictor").shape
    num_patches = _require(sd, "predictor_pos_embed", "predictor").shape[1]
    depth = _block_indices(sd, "predictor_blocks.")
    hidden = (
        _require(sd, "predictor_blocks.0.mlp.fc1.weight", "predictor").shape[0] if depth else 0
    )
    heads = _heads_for(embed_dim, None, num_heads, "predictor (encoder width)")
    if pred_dim % heads != 0:
        raise ValueError(f"predictor width {pred_dim} is not divisible by num_heads {heads}")
    return dict(
        num_patches=int(num_patches),
        embed_dim=int(embed_dim),
        predictor_embed_dim=int(pred_dim),
        depth=depth,
        num_heads=int(heads),
        mlp_ratio=_mlp_ratio(hidden, pred_dim) if depth else 4.0,
    )


def _select_state_dict(checkpoint: Mapping[str, Any], key: str, marker: str) -> dict:
    """Pick ``checkpoint[key]``, or the checkpoint itself if it already is a bare state dict."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    is_bare = any(
        isinstance(v, torch.Tensor) and (k == marker or k.endswith("." + marker))
        for k, v in checkpoint.items()
    )
    if is_bare:
        return strip_prefixes(checkpoint)
    if key not in checkpoint:
        raise KeyError(
            f"checkpoint has no {key!r} entry; available keys: {sorted(map(str, checkpoint))}"
        )
    chosen = checkpoint[key]
    if not isinstance(chosen, Mapping):
        raise ValueError(f"checkpoint[{key!r}] is a {type(chosen).__name__}, not a state dict")
    return strip_prefixes(chosen)


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
    state_dict = _select_state_dict(checkpoint, key, "patch_embed.proj.weight")
    cfg = infer_encoder_config(state_dict, num_heads=num_heads or num_heads_of(checkpoint))
    in_chans = state_dict["patch_embed.proj.weight"].shape[1]
    qkv_bias = "blocks.0.attn.qkv.bias" in state_dict or cfg["depth"] == 0

    def make():
        return VisionTransformer(
            img_size=cfg["img_size"],
            patch_size=cfg["patch_size"],
            in_chans=in_chans,
            embed_dim=cfg["embed_dim"],
            depth=cfg["depth"],
            num_heads=cfg["num_heads"],
            mlp_ratio=cfg["mlp_ratio"],
            qkv_bias=qkv_bias,
        )

    return _materialise(make, state_dict, dtype, device)


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
    state_dict = _select_state_dict(checkpoint, key, "predictor_embed.weight")
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
