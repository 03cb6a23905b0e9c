"""Does a checkpoint fit this model? Size checks that name the config key, and exact loading whose
failures are one line naming the tensor and the setting."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..errors import UserError
from ..models.vision_transformer import VIT_SIZES
from ..objectives import saved_objective


def add_module_prefix(state_dict: dict) -> dict:
    return {f"module.{k}": v for k, v in state_dict.items()}


def strip_module_prefix(state_dict: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _blocks(state: dict, prefix: str) -> int:
    indices = {k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}
    return len([i for i in indices if i.isdigit()])


def architecture(encoder_state: dict, predictor_state: dict) -> dict:
    """Size facts readable from a ViT encoder's and ViT predictor's weights (keys without `module.`),
    by the config key that sets them."""
    facts = {}
    patch = encoder_state.get("patch_embed.proj.weight")
    if patch is not None:
        facts["embed_dim"] = ("encoder width", "meta.embed_dim", int(patch.shape[0]))
        facts["patch_size"] = ("patch size", "mask.patch_size", int(patch.shape[-1]))
    pos = encoder_state.get("pos_embed")
    if pos is not None:
        facts["num_patches"] = ("patches per image", "data.crop_size", int(pos.shape[1]))
    facts["depth"] = ("encoder depth", "meta.depth", _blocks(encoder_state, "blocks."))
    facts["pred_depth"] = ("predictor depth", "meta.pred_depth", _blocks(predictor_state, "predictor_blocks."))
    embed = predictor_state.get("predictor_embed.weight")
    if embed is not None:
        facts["pred_emb_dim"] = ("predictor width", "meta.pred_emb_dim", int(embed.shape[0]))
    return facts


def check_architecture(state: dict, encoder: torch.nn.Module, predictor: torch.nn.Module, where,
                       names: tuple[str, str] = ("encoder", "predictor")) -> None:
    """UserError naming each size that differs between the checkpoint's weights (its entries `names`)
    and the config's model."""
    try:
        theirs = architecture(strip_module_prefix(state[names[0]]), strip_module_prefix(state[names[1]]))
    except (AttributeError, TypeError):
        raise UserError(f"{where}: '{names[0]}'/'{names[1]}' are not state dicts; not a training checkpoint") from None
    ours = architecture(encoder.state_dict(), predictor.state_dict())
    diffs = []
    for key, (what, config_key, value) in ours.items():
        if key in theirs and theirs[key][2] != value:
            diffs.append(f"{what} {theirs[key][2]}, the config asks for {value} ({config_key})")
    saved_meta = (state.get("config") or {}).get("meta") or {}
    saved_heads = saved_meta.get("num_heads") or VIT_SIZES.get(saved_meta.get("model_name"), {}).get("num_heads")
    heads = getattr(encoder, "num_heads", None)
    if saved_heads is not None and heads is not None and saved_heads != heads:
        diffs.append(f"{saved_heads} attention heads, the config asks for {heads} (meta.num_heads)")
    if diffs:
        model = saved_meta.get("model_name")
        hint = f" (it was trained with meta.model_name={model})" if model else ""
        raise UserError(f"{where} has {'; '.join(diffs)}{hint}. Resume with the checkpoint's model settings, "
                        f"or start a new logging.folder")


def check_objective(saved_config: Optional[dict], objective: str, where) -> None:
    saved = saved_objective(saved_config)
    if saved != objective:
        raise UserError(f"{where} was trained with meta.objective={saved}, this config sets meta.objective="
                        f"{objective}; resume with meta.objective={saved} or use a new logging.folder")


@contextlib.contextmanager
def loading_errors_as_user_errors(where):
    """A tensor or optimizer state that does not fit, as one line naming `where` and the fix."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{where} does not fit this model/optimizer ({type(exc).__name__}: {first}); "
                        f"resume with the checkpoint's config or use a new logging.folder") from None


def load_exactly(module: torch.nn.Module, weights: dict, where: str, sharded: bool = False) -> None:
    """load_state_dict, but a wrong shape or a missing/unexpected key is a UserError naming the tensor.
    With `sharded` (FSDP2 modules) every rank keeps its own shards of the full tensors given."""
    ours = module.state_dict()
    for name, value in weights.items():
        if name in ours and tuple(value.shape) != tuple(ours[name].shape):
            raise UserError(f"{where}: {name} has shape {list(value.shape)} there but {list(ours[name].shape)} in "
                            f"this model{_shape_hint(name, value, ours[name])}; set the model config to the "
                            f"checkpoint's architecture")
    missing = sorted(set(ours) - set(weights))
    unexpected = sorted(set(weights) - set(ours))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise UserError(f"{where}: {'; '.join(parts)} (a different depth: meta.depth / meta.pred_depth?); set the "
                        f"model config to the checkpoint's architecture")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(weights)


def _shape_hint(name: str, theirs: torch.Tensor, ours: torch.Tensor) -> str:
    if theirs.ndim and ours.ndim and theirs.shape[-1] != ours.shape[-1]:
        return " (a different width: meta.model_name / meta.embed_dim / meta.pred_emb_dim)"
    if name.endswith("pos_embed"):
        return " (a different number of patches: data.crop_size / mask.patch_size)"
    if name.endswith("patch_embed.proj.weight"):
        return " (a different patch size: mask.patch_size)"
    return ""
