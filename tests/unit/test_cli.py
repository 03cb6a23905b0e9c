import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ijepa_scale.cli import COMMANDS, main
from ijepa_scale.commands.train import parse_args as parse_train_args

ROOT = Path(__file__).resolve().parents[2]


def test_devices_and_trailing_overrides_are_separated():
    args = parse_train_args(["--fname", "c.yaml", "--devices", "cpu", "cpu", "optimization.epochs=2",
                             "data.batch_size=8"])
    assert args.devices == ["cpu", "cpu"]
    assert args.overrides == ["optimization.epochs=2", "data.batch_size=8"]


def test_usage_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"  {command} " in out


def test_every_command_module_is_in_the_table_and_has_a_main():
    import importlib
    import pkgutil

    import ijepa_scale.commands

    modules = {info.name for info in pkgutil.iter_modules(ijepa_scale.commands.__path__)}
    tabled = {module.rsplit(".", 1)[1] for module, _, _ in COMMANDS.values()
              if module.startswith("ijepa_scale.commands.")}
    assert modules - {"download", "export"} == tabled - {"download", "export"}
    for module, function, _ in COMMANDS.values():
        assert callable(getattr(importlib.import_module(module), function))


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")


@pytest.mark.parametrize("devices,message", [
    pytest.param(["cuda:0"], "CUDA is not available", marks=NO_CUDA),
    (["tpu"], "not a device name"),
])
def test_bad_devices_exit_2_with_one_line(tmp_path, devices, message):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  shards: /nowhere/a-{0..1}.tar\nlogging:\n  folder: " + str(tmp_path / "run") + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--fname", str(config), "--devices", *devices],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_missing_shard_exits_2_naming_the_url(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  shards: /nowhere/a-{0..1}.tar\nlogging:\n  folder: " + str(tmp_path / "run") + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--fname", str(config), "--devices", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "shard not found: /nowhere/a-0.tar" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_command_says_so(capsys):
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'nonsense'") and "usage: ijepa-scale COMMAND" in err
    assert main(["reprot"]) == 2
    assert "did you mean 'report'?" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "make-shards", "fashion-mnist", "bench-masks", "bench-data", "eval",
                                     "download", "export", "report", "diff", "show-masks"])
def test_every_subcommand_usage_names_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ijepa-scale {command} ")


VERSION_LINE = re.compile(r"^ijepa-scale (\d+\.\d+\.\d+) \((git [0-9a-f]{7,}(-dirty)?|no git)\)$")


def test_version_names_the_package_version_and_the_commit(capsys):
    import ijepa_scale

    assert main(["--version"]) == 0
    match = VERSION_LINE.match(capsys.readouterr().out.strip())
    assert match and match.group(1) == ijepa_scale.__version__
    assert main(["--versoin"]) == 2 and "did you mean '--version'?" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--version"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0 and VERSION_LINE.match(proc.stdout.strip()), proc.stderr
    from ijepa_scale.commands.slurm import parse_args as parse_slurm_args  # main_distributed.py's parser

    with pytest.raises(SystemExit) as exit_info:
        parse_slurm_args(["--version"])
    assert exit_info.value.code == 0 and VERSION_LINE.match(capsys.readouterr().out.strip())
    # setup.py reads the same one version.
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == ijepa_scale.__version__


@pytest.mark.parametrize("where", ["git missing", "not a checkout"])
def test_version_without_git_says_so(where, tmp_path, monkeypatch, capsys):
    from ijepa_scale import version

    if where == "git missing":
        monkeypatch.setenv("PATH", str(tmp_path))
    else:
        monkeypatch.setattr(version, "PACKAGE_DIR", tmp_path)
    version.git_commit.cache_clear()
    try:
        assert main(["--version"]) == 0
        assert capsys.readouterr().out.endswith(" (no git)\n") and version.run_info()["git"] is None
    finally:
        version.git_commit.cache_clear()


def _interrupted(argv):
    raise KeyboardInterrupt


def _reader_gone(argv):
    raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("function, code, message", [
    ("_interrupted", 130, "ijepa-scale fake: interrupted\n"),
    ("_reader_gone", 141, ""),
])
def test_ctrl_c_and_a_closed_pipe_end_a_command_without_a_traceback(function, code, message, monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "fake", (__name__, function, "raises"))
    assert main(["fake"]) == code
    assert capsys.readouterr().err == message


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `ijepa-scale ... | head -1`: more output than a pipe holds, and the reader leaves after one line.
    script = ("import sys; from ijepa_scale import cli; cli.COMMANDS['fake'] = ('tests.unit.test_cli', '_print_much', '');"
              " sys.exit(cli.main(['fake']))")
    proc = subprocess.run(f"{sys.executable} -c \"{script}\" | head -1", shell=True, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout == "line 0\n"
    assert proc.stderr == ""


def _print_much(argv):
    for i in range(200_000):
        print(f"line {i}")
