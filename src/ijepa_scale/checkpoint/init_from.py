"""meta.init_from: a new run takes weights (and optionally the optimizer state) from a checkpoint,
a Hugging Face model or a bare encoder; its step, schedules and data position stay at zero."""

from __future__ import annotations

import logging
from pathlib import Path

from ..distributed import env as dist_utils
from ..distributed.parallel import unwrap
from ..errors import UserError, one_line
from ..objectives import resolve, saved_objective
from ..objectives.base import IJEPA_ENTRIES
from .architecture import load_exactly
from .dcp import optimizer_state_to_fqns
from .parts import TrainingParts

logger = logging.getLogger("ijepa_scale")


def init_from(parts: TrainingParts, objective, objective_name: str, source: str, *, with_optimizer: bool,
              sharded: bool, is_main: bool) -> list[dict]:
    """Start `parts` from `source`; returns the run's lineage. Rank 0 fetches first, so a URL is
    downloaded once into the cache."""
    where = f"meta.init_from={source}"
    state = _read(source, where, is_main)
    own = (*parts.networks, *parts.ema_networks)
    if saved_objective(state.get("config")) == objective_name and all(isinstance(state.get(k), dict) for k in own):
        # A run of the same objective: every network by its name.
        nets = {k: _strip(state[k]) for k in own}
        modules = parts.modules()
    else:
        nets, modules = _ijepa_layout(state, parts, objective, where)
        for unused in [k for k in nets if k not in modules]:
            del nets[unused]  # e.g. another objective's predictor, which does not fit this one
            if is_main:
                logger.info("%s: its %s is not used (meta.objective=%s has its own)", where, unused, objective_name)
    for name, weights in nets.items():
        load_exactly(modules[name], weights, f"{where} ({name})", sharded=sharded)
    taken = sorted(nets)
    lacking = [k for k in parts.networks if k not in nets]
    if with_optimizer:
        _load_optimizer(parts, state, lacking, objective_name, where, sharded)
        taken.append("optimizer")
    if is_main:
        missing = f" ({', '.join(lacking)} start(s) from random weights)" if lacking else ""
        logger.info("initialised %s from %s%s; step, schedules and data start from zero", ", ".join(taken),
                    source, missing)
    return [{"init_from": source}]


def _strip(state: dict) -> dict:
    from ..weights.official import strip_prefixes

    return strip_prefixes(state)


def _read(source: str, where: str, is_main: bool) -> dict:
    from ..weights import fetch, load_checkpoint

    def fetch_once():
        try:
            return str(fetch(source))
        except FileNotFoundError as exc:
            raise UserError(f"{where}: {exc}") from None

    path = dist_utils.on_main_then_broadcast(is_main, fetch_once)
    try:
        state = load_checkpoint(path if Path(path).exists() else source)
    except UserError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{where}: cannot read it ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise UserError(f"{where} holds a {type(state).__name__}, not weights")
    return state


def _ijepa_layout(state: dict, parts: TrainingParts, objective, where: str) -> tuple[dict, dict]:
    """(weights by I-JEPA entry, the module each entry starts) for a checkpoint of another objective,
    an official one, or a bare encoder (e.g. Hugging Face)."""
    nets = {k: _strip(state[k]) for k in IJEPA_ENTRIES if isinstance(state.get(k), dict)}
    if not nets and "patch_embed.proj.weight" in _strip(state):
        nets["encoder"] = _strip(state)  # a bare encoder state dict (or a Hugging Face model)
    if "encoder" not in nets and "target_encoder" not in nets:
        raise UserError(f"{where} has no encoder weights (keys: {', '.join(map(str, list(state)[:8]))})")
    # One encoder only (e.g. Hugging Face): it starts both the context and the target encoder.
    nets.setdefault("encoder", nets.get("target_encoder"))
    nets.setdefault("target_encoder", nets["encoder"])
    every = {**parts.networks, **parts.ema_networks}
    modules = {entry: unwrap(resolve(every, path)) for entry, path in objective.ijepa_entries.items()}
    return nets, modules


def _load_optimizer(parts: TrainingParts, state: dict, lacking: list, objective_name: str, where: str,
                    sharded: bool) -> None:
    if not isinstance(state.get("opt"), dict):
        raise UserError(f"{where} has no optimizer state; set meta.init_optimizer=false")
    if lacking:
        raise UserError(f"{where} lacks {', '.join(lacking)} of meta.objective={objective_name}, so its optimizer "
                        f"state cannot fit; set meta.init_optimizer=false")
    try:
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(parts.trainable, parts.optimizer,
                                     optimizer_state_to_fqns(state["opt"], parts.param_names_per_group()),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            parts.optimizer.load_state_dict(state["opt"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{where}: its optimizer state does not fit this model ({one_line(exc)}); set "
                        f"meta.init_optimizer=false") from None
