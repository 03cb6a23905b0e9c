"""The official I-JEPA checkpoint format (facebookresearch/ijepa): key prefixes, architecture inferred from
the weights, which network of a checkpoint to take, and the official single-file layout.

The released files (``https://dl.fbaipublicfiles.com/ijepa/*.pth.tar``) are full training checkpoints: a dict
with ``encoder``, ``predictor`` and ``target_encoder`` state dicts (keys prefixed with DDP's ``module.``) plus
optimizer state and bookkeeping. The weights determine everything but the head count, which comes from the
caller, the checkpoint's config, or the official size table.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UserError
from ..models.vision_transformer import VIT_SIZES

_STRIPPABLE_PREFIXES = ("module.", "backbone.", "_orig_mod.")


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


def select_state_dict(checkpoint: Mapping[str, Any], key: str, marker: str) -> dict:
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


OFFICIAL_KEYS = ("encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss", "batch_size",
                 "world_size", "lr")


def to_official(checkpoint: Mapping[str, Any]) -> dict:
    """The official single-file layout (section 5 of the format): the three networks with `module.`
    prefixes plus the official bookkeeping keys that exist; ijepa-scale's extra keys are dropped."""
    out: dict[str, Any] = {}
    for key in ("encoder", "predictor", "target_encoder"):
        if isinstance(checkpoint.get(key), Mapping):
            state = strip_prefixes(checkpoint[key])
            if key != "predictor":
                refuse_energy_weights(state)  # the official code reads ViTs only
            out[key] = {f"module.{k}": v for k, v in state.items()}
    if not out:
        raise UserError("the source holds no encoder/predictor/target_encoder weights")
    for key in OFFICIAL_KEYS[3:]:
        out[key] = checkpoint.get(key)
    return out
