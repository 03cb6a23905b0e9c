"""A checkpoint file is data: no door that reads weights or training state runs code from it."""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from ijepa_scale.checkpoint import safe_load
from ijepa_scale.errors import UserError

SRC = Path(__file__).resolve().parents[2] / "src" / "ijepa_scale"


class RunsCode:
    """Unpickling this creates the folder `marker`: proof that the reader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "reading a checkpoint ran code from it"


def evil_checkpoint(path, marker):
    tensors = {"module.pos_embed": torch.zeros(1, 4, 8)}
    torch.save({"encoder": tensors, "target_encoder": tensors, "predictor": tensors, "payload": RunsCode(marker)},
               path)
    return path


def committed_dcp(folder, objects):
    import torch.distributed.checkpoint as dcp

    from ijepa_scale.checkpoint.dcp import COMMIT_MARKER, TRAINER_STATE

    dcp.save({"model": {"encoder.w": torch.ones(2)}, "opt": {"state": {"encoder.w": {"step": torch.tensor(1.0)}},
                                                       "param_groups": [{"lr": 0.1, "params": ["encoder.w"]}]}, **objects},
             checkpoint_id=str(folder), no_dist=True)
    torch.save({"step": 1, "config": {}}, folder / TRAINER_STATE)
    (folder / COMMIT_MARKER).write_text("ok\n")
    return folder


def refused(call, path):
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*asks to run"):
        call()


def test_the_safe_loader_names_the_file_and_the_code_it_asked_for(tmp_path, marker):
    path = evil_checkpoint(tmp_path / "x.pth.tar", marker)
    with pytest.raises(safe_load.UnsafeCheckpointError) as info:
        safe_load.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "mkdir" in message
    assert "weights_only" not in message and "will likely succeed" not in message


def test_a_damaged_file_is_not_called_unsafe(tmp_path):
    path = tmp_path / "x.pth.tar"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(pickle.UnpicklingError, match=r"^not a readable checkpoint \(Unsupported operand 110\)$"):
        safe_load.load(path)


def test_numpy_values_and_plain_python_still_load(tmp_path):
    import numpy as np

    torch.save({"loss": np.float64(0.5), "a": np.arange(3), "lr": 0.1, "epoch": 2, "names": ("a", None)},
               tmp_path / "ok.pt")
    state = safe_load.load(tmp_path / "ok.pt")
    assert state["loss"] == 0.5 and state["a"].tolist() == [0, 1, 2] and state["names"] == ("a", None)


def test_weights_doors_refuse_a_file_that_runs_code(tmp_path, marker):
    from ijepa_scale.checkpoint.files import load_checkpoint_file
    from ijepa_scale.evaluation.analyze import load_encoder as analyze_load_encoder
    from ijepa_scale.evaluation.evaluate import build_eval_encoder, describe_checkpoint
    from ijepa_scale.weights.load import load_checkpoint, load_encoder, load_predictor, load_pretrained

    path = evil_checkpoint(tmp_path / "jepa-latest.pth.tar", marker)
    refused(lambda: load_checkpoint(path), path)
    refused(lambda: load_encoder(str(path)), path)
    refused(lambda: load_predictor(str(path)), path)
    refused(lambda: load_pretrained(str(path)), path)
    refused(lambda: load_checkpoint_file(path), path)  # resume
    refused(lambda: describe_checkpoint(path, "target_encoder"), path)  # eval
    refused(lambda: build_eval_encoder(path, "target_encoder"), path)
    refused(lambda: analyze_load_encoder(path, "target_encoder", torch.device("cpu")), path)
    refused(lambda: load_checkpoint(tmp_path), path)  # a run folder whose latest is the file


def test_export_refuses_a_file_that_runs_code(tmp_path, marker, capsys):
    from ijepa_scale.commands.export import main as export_main

    path = evil_checkpoint(tmp_path / "x.pth.tar", marker)
    for fmt, out in (("hf", tmp_path / "hf"), ("official", tmp_path / "o.pth.tar")):
        assert export_main([str(path), str(out), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert "asks to run" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_init_from_refuses_a_file_that_runs_code(shards, tmp_path, marker):
    from tests.unit.test_trainer import make_trainer

    path = evil_checkpoint(tmp_path / "x.pth.tar", marker)
    with pytest.raises(UserError, match="asks to run"):
        make_trainer(shards, tmp_path / "run", init_from=str(path))


def test_dcp_folders_are_read_without_running_code(tmp_path, marker):
    from ijepa_scale.checkpoint.dcp import TRAINER_STATE, consolidate, dcp_tensor_shapes

    good = committed_dcp(tmp_path / "good.dcp", {"extra": {"note": "plain"}})
    assert consolidate(good)["encoder"]["module.w"].tolist() == [1.0, 1.0]

    entry = committed_dcp(tmp_path / "entry.dcp", {"extra": {"payload": RunsCode(marker)}})
    refused(lambda: consolidate(entry), "entry 'extra.payload'")
    target = {"extra": {"payload": None}}
    with pytest.raises(UserError, match="asks to run"):
        safe_load.load_dcp(target, entry)

    metadata = committed_dcp(tmp_path / "metadata.dcp", {})
    (metadata / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    refused(lambda: consolidate(metadata), metadata / ".metadata")
    refused(lambda: dcp_tensor_shapes(metadata), metadata / ".metadata")

    state = committed_dcp(tmp_path / "state.dcp", {})
    torch.save({"step": 1, "payload": RunsCode(marker)}, state / TRAINER_STATE)
    refused(lambda: consolidate(state), state / TRAINER_STATE)


def test_no_reader_bypasses_the_safe_loader():
    """Every torch.load / pickle load / DCP read in the package goes through safe_load."""
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|Unpickler\(|FileSystemReader\(|dcp\.load\(|"
                         r"weights_only\s*=\s*False")
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "safe_load.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and "safe_load." not in code:
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert offenders == []
