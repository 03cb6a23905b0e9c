"""The Hugging Face I-JEPA format (transformers' `IJepaModel`): key mapping both ways, config.json, read and write.

Hugging Face holds the encoder only (no predictor), with q/k/v as three Linears. Reading maps the
names back to the official ones and fuses q/k/v into ``attn.qkv`` (q, k, v order, as the official
converter splits them). Both naming schemes are read: the hub files' (``encoder.layer.N.attention.
attention.query``, transformers 4) and transformers 5's in-memory one (``layers.N.attention.q_proj``).
Writing uses the hub files' names, which every transformers version loads.

Which encoder: the paper evaluates the *target* encoder, average-pooled; the transformers port of
the released files (facebook/ijepa_*) was converted from the *context* encoder (``encoder``).
`export --format hf --key` picks which one goes into the Hugging Face directory.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import UserError
from ..fileutil import atomic_write
from ..models.vision_transformer import LAYER_NORM_EPS

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"

_BLOCK_RENAMES = (  # official block sub-key -> hub (transformers 4) sub-key
    ("norm1", "layernorm_before"),
    ("attn.proj", "attention.output.dense"),
    ("norm2", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)
_V5_BLOCK_RENAMES = {  # transformers 5 sub-key -> official
    "layernorm_before": "norm1", "attention.o_proj": "attn.proj", "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_TOP_RENAMES = (
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
)


class HFStateDict(OrderedDict):
    """An encoder state dict (official names) read from Hugging Face files, with their config.json."""

    config: dict = {}


def is_hf_source(source: Any) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    if path.is_dir():
        return (path / HF_CONFIG).is_file() and (path / HF_WEIGHTS).is_file()
    return path.suffix == ".safetensors" and path.is_file()


def official_to_hf(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Official encoder keys (no `module.`) -> the hub's IJepaModel keys; qkv split in q, k, v thirds."""
    top = dict(_TOP_RENAMES)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if not match:
            raise ValueError(f"unexpected encoder key {key!r}: not an official I-JEPA encoder state dict")
        index, sub, kind = match.groups()
        prefix = f"encoder.layer.{index}."
        if sub == "attn.qkv":
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{name}.{kind}"] = part.contiguous()
            continue
        renamed = dict(_BLOCK_RENAMES).get(sub)
        if renamed is None:
            raise ValueError(f"unexpected encoder key {key!r}: not an official I-JEPA encoder state dict")
        out[f"{prefix}{renamed}.{kind}"] = value
    return out


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """IJepaModel keys (hub or transformers-5 names, optional `ijepa.` prefix) -> official encoder keys."""
    top = {hf: ours for ours, hf in _TOP_RENAMES}
    hub_blocks = {hf: ours for ours, hf in _BLOCK_RENAMES}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("ijepa.")
        if name.startswith(("classifier.", "pooler.")):
            continue  # heads that are not part of the encoder
        if name in top:
            out[top[name]] = value
            continue
        match = re.fullmatch(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)", name)
        if not match:
            raise ValueError(f"unexpected Hugging Face I-JEPA key {key!r}")
        index, sub, kind = match.groups()
        part = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
                "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}.get(sub)
        if part:
            qkv.setdefault((index, kind), {})[part] = value
            continue
        renamed = hub_blocks.get(sub) or _V5_BLOCK_RENAMES.get(sub)
        if renamed is None:
            raise ValueError(f"unexpected Hugging Face I-JEPA key {key!r}")
        out[f"blocks.{index}.{renamed}.{kind}"] = value
    for (index, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {index} {kind}: query/key/value incomplete (have {sorted(parts)})")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)

    return OrderedDict(out)


def read_hf(source: str | os.PathLike) -> HFStateDict:
    """The encoder state dict (official names) of a Hugging Face I-JEPA directory or .safetensors file."""
    from safetensors.torch import load_file

    path = Path(source)
    weights = path / HF_WEIGHTS if path.is_dir() else path
    config_file = weights.with_name(HF_CONFIG)
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config and config.get("model_type") not in (None, "ijepa"):
        raise UserError(f"{config_file}: model_type {config.get('model_type')!r} is not an I-JEPA model ('ijepa')")
    eps = config.get("layer_norm_eps")
    if eps is not None and abs(float(eps) - LAYER_NORM_EPS) > 1e-12:
        raise UserError(f"{config_file}: layer_norm_eps {eps} differs from I-JEPA's {LAYER_NORM_EPS}; these "
                        f"weights would give other outputs here")
    result = HFStateDict(hf_to_official(load_file(str(weights))))
    result.config = config
    return result


def hf_config(state_dict: Mapping[str, torch.Tensor], num_heads: int) -> dict:
    """config.json for `IJepaModel` from official encoder weights (architecture read from them)."""
    patch = state_dict["patch_embed.proj.weight"]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    grid = int(round(state_dict["pos_embed"].shape[1] ** 0.5))
    return {
        "architectures": ["IJepaModel"],
        "model_type": "ijepa",
        "hidden_size": int(patch.shape[0]),
        "num_hidden_layers": depth,
        "num_attention_heads": int(num_heads),
        "intermediate_size": int(state_dict["blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * int(patch.shape[0]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,
        "image_size": grid * int(patch.shape[-1]),
        "patch_size": int(patch.shape[-1]),
        "num_channels": int(patch.shape[1]),
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "torch_dtype": "float32",
    }


def write_hf(state_dict: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, num_heads: int) -> Path:
    """Write `config.json` + `model.safetensors` that `transformers.IJepaModel.from_pretrained` loads."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in official_to_hf(state_dict).items()}
    config = hf_config(state_dict, num_heads)
    atomic_write(out / HF_WEIGHTS, lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    atomic_write(out / HF_CONFIG, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    return out
