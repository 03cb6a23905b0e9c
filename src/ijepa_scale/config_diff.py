"""The resolved config of a run folder, a checkpoint or a YAML file, and the keys where configs differ.

Configs are compared after loading, so a YAML with old key names (config.RENAMED) equals the same config
written with the new ones, and a default left out equals the default written out. Keys are dotted
(`optimization.lr`, `collapse.thresholds.eff_rank`); a section one config does not use (another
objective's) shows as "(not used)".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import RUN_INFO_KEY, config_from_dict, load_config
from .errors import UserError

PARAMS_GLOB = "params-*.yaml"
YAML_SUFFIXES = (".yaml", ".yml")
# Differs between any two runs by construction; listed only when asked (`diff --all`).
IGNORED_KEYS = ("logging.folder",)
NOT_USED = object()
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


@dataclass
class RunConfig:
    path: Path
    kind: str  # "run folder (params-ijepa.yaml)", "checkpoint", "YAML"
    flat: dict[str, Any]  # dotted key -> value of the resolved config
    run_info: Optional[dict] = None  # the `ijepa_scale` entry of a params yaml: version and git commit

    def describe(self) -> str:
        code = ""
        if self.run_info:
            commit = self.run_info.get("git")
            commit = f"git {commit}" if commit else "no git"
            code = f"; written by ijepa-scale {self.run_info.get('version')} ({commit})"
        return f"{self.path} ({self.kind}{code})"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = list(value) if isinstance(value, tuple) else value
    return flat


def _from_yaml(path: Path, kind: str) -> RunConfig:
    cfg = load_config(path)  # names the file and the line of anything that is not a valid config
    raw = yaml.safe_load(path.read_text())
    info = raw.get(RUN_INFO_KEY) if isinstance(raw, dict) else None
    return RunConfig(path, kind, flatten(cfg.to_dict()), info if isinstance(info, dict) else None)


def _from_checkpoint(path: Path) -> RunConfig:
    from .checkpoint import safe_load
    from .checkpoint.dcp import TRAINER_STATE, is_dcp_checkpoint

    target = path / TRAINER_STATE if is_dcp_checkpoint(path) else path
    with open(target, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (a pickle in the legacy format): anything else is not one.
    if head != ZIP_MAGIC and head[:1] != PICKLE_MAGIC:
        raise UserError(f"{path}: not a checkpoint (a torch file is a zip archive or a pickle); pass a run folder, "
                        f"a checkpoint or a YAML config (*.yaml)")
    try:
        # Memory-mapped, the tensors stay on disk: only the small fields are read.
        state = safe_load.load(target, mmap=head == ZIP_MAGIC)
    except UserError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable checkpoint ({reason})") from None
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict):
        raise UserError(f"{path}: this checkpoint records no config (an official or exported checkpoint?); "
                        f"diff the run's params-ijepa.yaml or its config YAML instead")
    return RunConfig(path, "checkpoint", flatten(config_from_dict(config, where=f"{path} (its config)").to_dict()))


def read_config(source: str | Path) -> RunConfig:
    """The resolved config of a run folder (its params yaml, else its latest checkpoint), a checkpoint file or
    `.dcp` folder, or a YAML config; UserError (one line) for anything else."""
    from .checkpoint.dcp import is_dcp_checkpoint
    from .checkpoint.files import run_folder_latest

    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; pass a run folder, a checkpoint (*.pth.tar) or a YAML "
                        f"config")
    if path.is_dir() and not is_dcp_checkpoint(path):
        params = sorted(path.glob(PARAMS_GLOB))
        if len(params) > 1:
            raise UserError(f"{path} holds several params yamls ({', '.join(p.name for p in params)}); pass one of "
                            f"them")
        latest = params or run_folder_latest(path)
        if len(latest) == 1:
            found = _from_yaml(latest[0], "") if params else _from_checkpoint(latest[0])
            found.path, found.kind = path, f"run folder, {latest[0].name}"
            return found
        raise UserError(f"{path} holds no {PARAMS_GLOB} and no single *-latest checkpoint: not a run folder; pass "
                        f"a run's logging.folder, a checkpoint or a YAML config")
    if path.suffix.lower() in YAML_SUFFIXES:
        return _from_yaml(path, "YAML")
    return _from_checkpoint(path)


def differing_keys(configs: list[RunConfig], ignored=IGNORED_KEYS) -> tuple[dict[str, list], list[str]]:
    """({dotted key: one value per config} for the keys that differ, the ignored keys that differ too)."""
    keys = sorted({key for c in configs for key in c.flat}, key=lambda k: (k.split(".")[0], k))
    differ, left_out = {}, []
    for key in keys:
        values = [c.flat.get(key, NOT_USED) for c in configs]
        if all(v == values[0] for v in values):
            continue
        if key in ignored:
            left_out.append(key)
        else:
            differ[key] = values
    return differ, left_out


def show(value: Any) -> str:
    """A value as the YAML it would be written as (`null`, `true`, `[0.3, 1.0]`, `''`)."""
    if value is NOT_USED:
        return "(not used)"
    if isinstance(value, str) and value and value.strip() == value and not value.startswith(("[", "{", "'", '"')):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def also_differ(keys: list[str]) -> str:
    return f"{', '.join(keys)} {'differs' if len(keys) == 1 else 'differ'} too"


def format_table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
