import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ijepa_scale.config import RENAMED, ConfigError, apply_overrides, config_from_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL = ["in1k_vith14_ep300", "in1k_vith16-448_ep300", "in22k_vith14_ep66", "in22k_vitg16_ep44"]


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(**sections):
    raw = {"data": {"root_path": "/data"}, "logging": {"folder": "/tmp/x"}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_configs_parse_with_official_values(name, caplog):
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    # The released files carry a placeholder root_path; a user sets it on the command line.
    with caplog.at_level(logging.WARNING, logger="ijepa_scale"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["data.root_path=/datasets"])
    assert caplog.records == []  # official keys are read silently
    assert cfg.meta.model_name == raw["meta"]["model_name"]
    assert cfg.data.batch_size == raw["data"]["batch_size"]
    assert cfg.optimization.final_lr == pytest.approx(1e-6)
    assert cfg.optimization.ema == (0.996, 1.0)
    assert cfg.mask.pred_mask_scale == (0.15, 0.2)
    assert cfg.distributed.dtype == "bfloat16"
    assert cfg.data.shards is None and cfg.mask.legacy_sampler is False


def test_official_placeholder_root_path_is_rejected_with_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root_path is still the official placeholder.*data.root_path="):
        load_config(ROOT / "configs" / "in1k_vith14_ep300.yaml")


def test_all_shipped_configs_parse_without_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger="ijepa_scale"):
        for path in sorted((ROOT / "configs").glob("*.yaml")):
            load_config(path, ["data.root_path=/datasets"])
    assert caplog.records == []


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = write(tmp_path, "data:\n  batchsize: 8\n  root_path: /d\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "data.batchsize" in message and "did you mean 'data.batch_size'" in message


def test_unknown_section(tmp_path):
    path = write(tmp_path, "optimisation:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'optimisation'.*'optimization'"):
        load_config(path)


@pytest.mark.parametrize(
    "section,key,value,pattern",
    [
        ("data", "batch_size", "eight", r"data.batch_size must be int"),
        ("data", "batch_size", 0, r"data.batch_size=0 must be > 0"),
        ("data", "crop_scale", [0.5], r"data.crop_scale must be a list of 2"),
        ("data", "crop_scale", [0.9, 0.3], r"data.crop_scale=\[0.9, 0.3\]"),
        ("meta", "use_bfloat16", "yes", r"meta.use_bfloat16 must be bool"),
        ("distributed", "dtype", "fp8", r"distributed.dtype='fp8' must be one of"),
        ("optimization", "loss", "l3", r"optimization.loss='l3'"),
        ("data", "on_error", "ignore", r"data.on_error='ignore'"),
        ("checkpoint", "keep_last", -1, r"checkpoint.keep_last=-1"),
        ("meta", "copy_data", True, r"meta.copy_data=true"),
    ],
)
def test_bad_values_name_the_key(section, key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(minimal(**{section: {key: value}}))


def test_types_are_coerced_losslessly():
    cfg = config_from_dict(minimal(optimization={"lr": 1, "final_lr": "1e-6", "warmup": 3}))
    assert cfg.optimization.lr == 1.0 and isinstance(cfg.optimization.lr, float)
    assert cfg.optimization.final_lr == 1e-6
    with pytest.raises(ConfigError, match="optimization.epochs must be int"):
        config_from_dict(minimal(optimization={"epochs": 2.5}))


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, yaml.safe_dump(minimal()))
    cfg = load_config(path, ["optimization.epochs=2", "data.batch_size=8", "data.crop_scale=[0.5, 1.0]",
                             "meta.read_checkpoint=null"])
    assert cfg.optimization.epochs == 2 and cfg.data.batch_size == 8 and cfg.data.crop_scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match="data.batch_size must be int"):
        load_config(path, ["data.batch_size=big"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(path, ["epochs=2"])

def test_an_override_error_names_the_override_not_the_file(tmp_path):
    path = write(tmp_path, yaml.safe_dump(minimal()))
    for override, message in (
        ("optimization.lrr=1", "override optimization.lrr=1: unknown key 'lrr' in optimization; did you mean 'lr'?"),
        ("data.num_worker=2", "override data.num_worker=2: unknown key 'num_worker' in data; did you mean "
                              "'num_workers'?"),
        ("optimisation.lr=1", "override optimisation.lr=1: unknown section 'optimisation'; did you mean "
                              "'optimization'?"),
        ("data.batch_size=big", "override data.batch_size=big: data.batch_size must be int, got 'big' (str)"),
        ("meta.seed.x=1", "override meta.seed.x=1: meta.seed is not a mapping; use meta.seed=value"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(path, [override])
        assert str(info.value) == message and str(path) not in str(info.value)


def test_a_mapping_entry_can_be_overridden(tmp_path):
    path = write(tmp_path, yaml.safe_dump(minimal(collapse={"thresholds": {"eff_rank": 3.0}})))
    cfg = load_config(path, ["collapse.thresholds.pred_norm=0.5"])
    assert cfg.collapse.thresholds == {"pred_norm": 0.5, "target_std": 0.01, "eff_rank": 3.0}


# A value for each moved key (by its new path), and what the rest of the config needs for it.
MOVED_VALUES = {"parallel": "fsdp", "dtype": "bfloat16", "activation_checkpointing": True, "compile": True,
                "accum_steps": 2, "every_steps": 7, "keep_last": 3, "async_save": True, "every_epochs": 2,
                "train_shards": "t.tar", "val_shards": "v.tar", "patience": 4, "pred_norm": 0.5, "target_std": 0.5,
                "eff_rank": 0.5, "open_frac": 0.5}


def moved_case(old, new):
    """(a config with `old` set, the expected value at `new`) for one moved key."""
    raw = minimal(meta={"objective": "gated"} if new[-1] == "open_frac" else {})
    if new[0] == "evaluation" and not new[1].endswith("shards"):
        raw["evaluation"] = {"train_shards": "t.tar", "val_shards": "v.tar"}
    raw.setdefault(old[0], {})[old[1]] = MOVED_VALUES[new[-1]]
    return raw, MOVED_VALUES[new[-1]]


def value_at(cfg, path):
    section = getattr(cfg, path[0])
    return section.thresholds[path[2]] if len(path) == 3 else getattr(section, path[1])


@pytest.mark.parametrize("old,new", list(RENAMED.items()), ids=[".".join(k) for k in RENAMED])
def test_a_moved_key_still_loads_from_yaml_with_one_warning(old, new, tmp_path, caplog):
    raw, expected = moved_case(old, new)
    path = write(tmp_path, yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="ijepa_scale"):
        cfg = load_config(path)
    assert value_at(cfg, new) == expected
    old_key, new_key = ".".join(old), ".".join(new)
    assert [r.getMessage() for r in caplog.records] == [f"{path}: {old_key} is deprecated, use {new_key}"]
    # Both spellings: one line naming both.
    both = yaml.safe_load(yaml.safe_dump(raw))
    holder = both.setdefault(new[0], {})
    if len(new) == 3:
        holder = holder.setdefault(new[1], {})
    holder[new[-1]] = expected
    with pytest.raises(ConfigError, match=f"both {old_key} and {new_key} are set") as info:
        config_from_dict(both)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("old,new", list(RENAMED.items()), ids=[".".join(k) for k in RENAMED])
def test_a_moved_key_still_works_as_an_override(old, new, tmp_path, caplog):
    raw, expected = moved_case(old, new)
    raw[old[0]].pop(old[1])
    path = write(tmp_path, yaml.safe_dump(raw))
    override = f"{'.'.join(old)}={yaml.safe_dump(expected).splitlines()[0]}"
    with caplog.at_level(logging.WARNING, logger="ijepa_scale"):
        cfg = load_config(path, [override])
    assert value_at(cfg, new) == expected
    assert [r.getMessage() for r in caplog.records] == [
        f"override {override}: {'.'.join(old)} is deprecated, use {'.'.join(new)}"]
    new_override = f"{'.'.join(new)}={yaml.safe_dump(expected).splitlines()[0]}"
    with pytest.raises(ConfigError, match="both set .* by its old name"):
        load_config(path, [override, new_override])


def test_an_override_replaces_a_moved_key_of_the_file(tmp_path):
    old = next(k for k, v in RENAMED.items() if v == ("checkpoint", "keep_last"))
    path = write(tmp_path, yaml.safe_dump(minimal(**{old[0]: {old[1]: 3}})))
    assert load_config(path, ["checkpoint.keep_last=5"]).checkpoint.keep_last == 5


def test_collapse_thresholds_are_the_objectives_metrics():
    assert config_from_dict(minimal()).collapse.thresholds == {"pred_norm": 0.1, "target_std": 0.01, "eff_rank": 2.0}
    gated = config_from_dict(minimal(meta={"objective": "gated"}, collapse={"thresholds": {"pred_loss": 0.01}}))
    assert gated.collapse.thresholds == {"pred_norm": 0.1, "target_std": 0.01, "eff_rank": 2.0, "pred_loss": 0.01,
                                         "open_frac": 0.02}
    with pytest.raises(ConfigError, match=r"collapse.thresholds.open_frac: meta.objective=ijepa logs no metric "
                                          r"'open_frac' .*; it logs pred_norm, target_std, eff_rank$"):
        config_from_dict(minimal(collapse={"thresholds": {"open_frac": 0.1}}))


def test_dtype_resolution():
    assert config_from_dict(minimal()).distributed.dtype == "float32"
    assert config_from_dict(minimal(meta={"use_bfloat16": True})).distributed.dtype == "bfloat16"
    cfg = config_from_dict(minimal(meta={"use_bfloat16": True}, distributed={"dtype": "float16"}))
    assert cfg.distributed.dtype == "float16"


def test_crop_must_be_multiple_of_patch():
    with pytest.raises(ConfigError, match="crop_size=30 is not a multiple of mask.patch_size=4"):
        config_from_dict(minimal(data={"crop_size": 30}, mask={"patch_size": 4}))


def test_dump_round_trips():
    cfg = config_from_dict(minimal(data={"shards": "a-{0..3}.tar"}, optimization={"clip_grad": 1.0},
                                   meta={"objective": "gated"}, collapse={"thresholds": {"open_frac": 0.1}},
                                   checkpoint={"keep_last": 2}, distributed={"parallel": "fsdp"}))
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_apply_overrides_does_not_mutate_input():
    raw = minimal()
    apply_overrides(raw, ["data.batch_size=3"])
    assert "batch_size" not in raw["data"]


def test_main_reports_config_error_in_one_line(tmp_path):
    path = write(tmp_path, "data:\n  batchsize: 8\n")
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--fname", str(path), "--devices", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.batchsize" in lines[0] and "Traceback" not in proc.stderr


def test_a_brace_pattern_the_shell_expanded_is_named_with_the_quoted_form():
    expanded = [f"data.shards=/nonexistent/x-{i:03d}.tar" for i in range(4)]
    with pytest.raises(ConfigError, match=r"the shell expanded a brace pattern into 4 overrides; quote it: "
                                          r"data.shards='/nonexistent/x-\{000..003\}.tar'$"):
        apply_overrides({}, expanded)
    # A key simply given twice still means the last value.
    assert apply_overrides({"optimization": {}}, ["optimization.epochs=2", "optimization.epochs=3"]) == {
        "optimization": {"epochs": 3}}
