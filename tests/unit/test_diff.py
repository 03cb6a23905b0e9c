"""`ijepa-scale diff A B`: resolved config keys that differ between runs, checkpoints and YAML files;
the version and commit a run's params yaml and log record."""

from __future__ import annotations

import pytest
import torch
import yaml

from ijepa_scale import __version__
from ijepa_scale.commands.diff import main
from ijepa_scale.config import config_from_dict, load_config
from ijepa_scale.version import git_commit, version_line
from tests.helpers.runs import train_tiny_run


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    logs = train_tiny_run(shards, folder / "a", epochs=1)
    train_tiny_run(shards, folder / "b", epochs=1, lr=0.004, weight_decay=0.05)
    return folder, logs


def test_a_run_and_its_own_checkpoint_do_not_differ(runs, capsys):
    folder, _ = runs
    assert main([str(folder / "a"), str(folder / "a" / "jepa-latest.pth.tar")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"A: {folder / 'a'} (run folder, params-ijepa.yaml; written by {version_line()})"
    assert out[1] == f"B: {folder / 'a' / 'jepa-latest.pth.tar'} (checkpoint)" and out[2:] == ["no differences"]


def test_two_runs_differ_with_exit_1_dotted_keys_and_both_values(runs, capsys):
    folder, _ = runs
    assert main([str(folder / "a"), str(folder / "b" / "jepa-latest.pth.tar")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "2 config key(s) differ:" and out[3].split() == ["key", "A", "B"]
    assert [line.split() for line in out[4:6]] == [["optimization.lr", "0.001", "0.004"],
                                                   ["optimization.weight_decay", "0.04", "0.05"]]
    assert out[6] == "(logging.folder differs too; --all lists it)"
    assert main([str(folder / "a"), str(folder / "b"), "--all"]) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["logging.folder", str(folder / "a"), str(folder / "b")] in rows


def test_old_key_names_resolve_to_the_new_ones(tmp_path, capsys):
    common = "data:\n  shards: /data/x-{0..1}.tar\nlogging:\n  folder: /runs/x\n"
    (tmp_path / "old.yaml").write_text(common + "  checkpoint_every_steps: 50\nmeta:\n  parallel: fsdp\n")
    (tmp_path / "new.yml").write_text(common + "checkpoint:\n  every_steps: 50\ndistributed:\n  parallel: fsdp\n")
    assert main([str(tmp_path / "old.yaml"), str(tmp_path / "new.yml")]) == 0
    assert capsys.readouterr().out.endswith("no differences\n")
    (tmp_path / "new.yml").write_text(common + "collapse:\n  thresholds:\n    eff_rank: 1.5\n")
    assert main([str(tmp_path / "old.yaml"), str(tmp_path / "new.yml")]) == 1
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[4:]]
    assert lines == [["checkpoint.every_steps", "50", "0"], ["collapse.thresholds.eff_rank", "2.0", "1.5"],
                     ["distributed.parallel", "fsdp", "ddp"]]


def _not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _binary_yaml(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"PK\x03\x04\x80\x81 a checkpoint renamed")
    return tmp_path / "c.yaml"


def _text_checkpoint(tmp_path):
    (tmp_path / "x.pth.tar").write_text("meta:\n  model_name: vit_tiny\n")
    return tmp_path / "x.pth.tar"


def _checkpoint_without_config(tmp_path):
    torch.save({"encoder": {"w": torch.zeros(2)}, "epoch": 3}, tmp_path / "official.pth.tar")
    return tmp_path / "official.pth.tar"


@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "nowhere", "nowhere: no such file or folder; pass a run folder"),
    (_not_a_run, "empty holds no params-*.yaml and no single *-latest checkpoint: not a run folder"),
    (_binary_yaml, "c.yaml is not a YAML config (not UTF-8 text"),
    (_text_checkpoint, "x.pth.tar: not a checkpoint (a torch file is a zip archive or a pickle)"),
    (_checkpoint_without_config, "official.pth.tar: this checkpoint records no config"),
])
def test_a_bad_argument_is_one_line_and_exit_2(runs, tmp_path, capsys, make, message):
    assert main([str(runs[0] / "a"), str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_the_params_yaml_records_the_code_and_still_loads_as_a_config(runs):
    folder, logs = runs
    params = folder / "a" / "params-ijepa.yaml"
    raw = yaml.safe_load(params.read_text())
    assert raw["ijepa_scale"] == {"version": __version__, "git": git_commit()}
    saved = torch.load(folder / "a" / "jepa-latest.pth.tar", weights_only=True)["config"]
    assert load_config(params).to_dict() == config_from_dict(raw).to_dict() == config_from_dict(saved).to_dict()
    assert logs[0] == version_line()  # the first line of rank 0's log


def test_a_run_folder_without_params_and_a_dcp_folder_give_their_checkpoints_config(runs, tmp_path, capsys):
    folder, _ = runs
    state = torch.load(folder / "b" / "jepa-latest.pth.tar", weights_only=True)
    (tmp_path / "run").mkdir()
    torch.save(state, tmp_path / "run" / "jepa-latest.pth.tar")  # a run folder whose params yaml is gone
    (tmp_path / "x.dcp").mkdir()
    (tmp_path / "x.dcp" / ".metadata").write_bytes(b"")  # only trainer.pt is read
    torch.save({"step": 6, "config": state["config"]}, tmp_path / "x.dcp" / "trainer.pt")
    assert main([str(tmp_path / "run"), str(tmp_path / "x.dcp")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"A: {tmp_path / 'run'} (run folder, jepa-latest.pth.tar)", f"B: {tmp_path / 'x.dcp'} (checkpoint)",
                   "no differences"]


def test_another_objectives_section_is_not_used(tmp_path, capsys):
    common = "data:\n  shards: /data/x-{0..1}.tar\nlogging:\n  folder: /runs/x\n"
    (tmp_path / "a.yaml").write_text(common)
    (tmp_path / "b.yaml").write_text(common + "meta:\n  objective: pkt\n")
    assert main([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["meta.objective", "ijepa", "pkt"] in rows and ["pkt.grouping", "(not", "used)", "image"] in rows
