import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ijepa_scale.config import ConfigError, apply_overrides, config_from_dict, dump_config, load_config

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
def test_official_configs_parse_with_official_values(name):
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    # The released files carry a placeholder root_path; a user sets it on the command line.
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["data.root_path=/datasets"])
    assert cfg.meta.model_name == raw["meta"]["model_name"]
    assert cfg.data.batch_size == raw["data"]["batch_size"]
    assert cfg.optimization.final_lr == pytest.approx(1e-6)
    assert cfg.optimization.ema == (0.996, 1.0)
    assert cfg.mask.pred_mask_scale == (0.15, 0.2)
    assert cfg.meta.resolved_dtype == "bfloat16"
    assert cfg.data.shards is None and cfg.mask.legacy_sampler is False


def test_official_placeholder_root_path_is_rejected_with_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root_path is still the official placeholder.*data.root_path="):
        load_config(ROOT / "configs" / "in1k_vith14_ep300.yaml")


def test_all_shipped_configs_parse():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path, ["data.root_path=/datasets"])


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
        ("meta", "dtype", "fp8", r"meta.dtype='fp8' must be one of"),
        ("optimization", "loss", "l3", r"optimization.loss='l3'"),
        ("data", "on_error", "ignore", r"data.on_error='ignore'"),
        ("logging", "keep_last", -1, r"logging.keep_last=-1"),
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
    with pytest.raises(ConfigError, match="did you mean 'data.num_workers'"):
        load_config(path, ["data.num_worker=2"])


def test_dtype_resolution():
    assert config_from_dict(minimal()).meta.resolved_dtype == "float32"
    assert config_from_dict(minimal(meta={"use_bfloat16": True})).meta.resolved_dtype == "bfloat16"
    assert config_from_dict(minimal(meta={"use_bfloat16": True, "dtype": "float16"})).meta.resolved_dtype == "float16"


def test_crop_must_be_multiple_of_patch():
    with pytest.raises(ConfigError, match="crop_size=30 is not a multiple of mask.patch_size=4"):
        config_from_dict(minimal(data={"crop_size": 30}, mask={"patch_size": 4}))


def test_dump_round_trips():
    cfg = config_from_dict(minimal(data={"shards": "a-{0..3}.tar"}, optimization={"clip_grad": 1.0}))
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
