"""`ijepa-scale export` never overwrites without --overwrite, never writes over its source, writes atomically,
and turns an unwritable target into one line."""

from __future__ import annotations

import os

import pytest
import torch

from ijepa_scale.commands.export import main as export_main
from ijepa_scale.models import build_encoder, build_predictor
from ijepa_scale.weights import export as export_module
from ijepa_scale.weights import load_encoder
from tests.unit.test_pretrained import official_checkpoint


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", 32, 8, depth=1).eval()
    predictor = build_predictor(encoder, pred_depth=1, pred_emb_dim=48).eval()
    path = tmp_path_factory.mktemp("src") / "c.pth.tar"
    torch.save(official_checkpoint(encoder, predictor, encoder), path)
    return path.read_bytes()


@pytest.fixture()
def run(tmp_path, checkpoint_bytes):
    """A run folder holding its training checkpoint."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "jepa-latest.pth.tar").write_bytes(checkpoint_bytes)
    return folder


def refused(capsys, argv, *words):
    assert export_main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "Traceback" not in err and captured.out == ""
    for word in words:
        assert word in err, err
    return err


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_official_refuses_an_existing_file_unless_overwrite(run, tmp_path, capsys):
    out = tmp_path / "notes.pth.tar"
    out.write_bytes(b"someone else's file")
    refused(capsys, [run, out, "--format", "official"], str(out), "exists", "--overwrite")
    assert out.read_bytes() == b"someone else's file"
    assert export_main([str(run), str(out), "--format", "official", "--overwrite"]) == 0
    assert set(torch.load(out, weights_only=True)) >= {"encoder", "predictor", "target_encoder"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("fmt", ["official", "hf"])
def test_never_writes_over_its_own_source(run, capsys, overwrite, fmt):
    ckpt = run / "jepa-latest.pth.tar"
    before = ckpt.read_bytes()
    # The file itself, the run folder holding it, and the run folder as both source and output.
    for source, out in ((ckpt, ckpt), (run, ckpt), (run, run)):
        refused(capsys, [source, out, "--format", fmt, *overwrite], "source")
    refused(capsys, [ckpt, run, "--format", fmt, *overwrite], "source")  # the output folder holds the source
    assert ckpt.read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["jepa-latest.pth.tar"]


def test_never_writes_over_its_source_through_a_link(run, tmp_path, capsys):
    ckpt = run / "jepa-latest.pth.tar"
    before = ckpt.read_bytes()
    os.link(ckpt, tmp_path / "hard.pth.tar")
    os.symlink(ckpt, tmp_path / "soft.pth.tar")
    for source in (ckpt, run):
        for link in ("hard.pth.tar", "soft.pth.tar"):
            refused(capsys, [source, tmp_path / link, "--format", "official", "--overwrite"], "source")
    # The same, with the source given as a link to the file that is written.
    refused(capsys, [tmp_path / "soft.pth.tar", ckpt, "--format", "official", "--overwrite"], "source")
    assert ckpt.read_bytes() == before and (tmp_path / "hard.pth.tar").read_bytes() == before


def test_never_writes_inside_a_sharded_checkpoint_folder(tmp_path, capsys):
    dcp = tmp_path / "jepa-latest.dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"metadata")
    refused(capsys, [dcp, dcp / "official.pth.tar", "--format", "official"], "source", "outside")
    refused(capsys, [dcp, dcp / ".metadata", "--format", "official", "--overwrite"], "source")
    assert sorted(p.name for p in dcp.iterdir()) == [".metadata"]


def test_hf_onto_an_existing_file_or_a_foreign_folder_is_one_line(run, tmp_path, capsys):
    out = tmp_path / "weights.bin"
    out.write_bytes(b"data")
    for overwrite in ([], ["--overwrite"]):
        refused(capsys, [run, out, "--format", "hf", *overwrite], "is a file", "folder")
    assert out.read_bytes() == b"data"
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"jpg")
    refused(capsys, [run, folder, "--format", "hf", "--overwrite"], "other files", "cat.jpg")
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]
    refused(capsys, [run, folder, "--format", "official", "--overwrite"], "is a folder", "official.pth.tar")


def test_hf_folder_is_replaced_only_with_overwrite(run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()  # an empty folder holds nothing to overwrite
    assert export_main([str(run), str(out), "--format", "hf"]) == 0
    capsys.readouterr()
    weights = (out / "model.safetensors").read_bytes()
    (out / "config.json").write_text("{}")
    refused(capsys, [run, out, "--format", "hf"], "exists", "--overwrite")
    assert (out / "config.json").read_text() == "{}"
    assert export_main([str(run), str(out), "--format", "hf", "--key", "encoder", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() == weights and (out / "config.json").read_text() != "{}"
    assert load_encoder(out).embed_dim == 192
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["official", "hf"])
def test_unwritable_target_is_one_line(run, tmp_path, capsys, monkeypatch, fmt):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    refused(capsys, [run, blocker / "sub" / "out", "--format", fmt], "cannot write", "a-file")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: make creating a file there fail as it would

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(export_module.tempfile, "TemporaryFile", denied)
    try:
        refused(capsys, [run, locked / "out", "--format", fmt], "cannot write", "Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("fmt", ["official", "hf"])
def test_a_failed_write_leaves_the_old_output_and_no_partial_one(run, tmp_path, capsys, monkeypatch, fmt):
    out = tmp_path / ("out.pth.tar" if fmt == "official" else "hf")
    assert export_main([str(run), str(out), "--format", fmt]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (out.iterdir() if out.is_dir() else [out])}

    def write_half_then_fail(state, folder, heads):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    def save_half_then_fail(obj, f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "write_hf", write_half_then_fail)
    monkeypatch.setattr(export_module.torch, "save", save_half_then_fail)
    refused(capsys, [run, out, "--format", fmt, "--overwrite"], "cannot write", "No space left on device")
    assert {p.name: p.read_bytes() for p in (out.iterdir() if out.is_dir() else [out])} == before
    assert leftovers(tmp_path) == []


def test_a_url_source_is_checked_before_it_is_downloaded(run, tmp_path, capsys, monkeypatch):
    from ijepa_scale.weights.download import CACHE_ENV_VAR, cache_path

    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV_VAR, str(cache))
    url = (run / "jepa-latest.pth.tar").resolve().as_uri()
    out = tmp_path / "taken.pth.tar"
    out.write_bytes(b"keep")
    refused(capsys, [url, out, "--format", "official"], "exists")
    assert not cache.exists() and out.read_bytes() == b"keep"  # refused without downloading
    assert export_main([url, str(tmp_path / "new.pth.tar"), "--format", "official"]) == 0
    capsys.readouterr()
    cached = cache_path(url, cache)
    before = cached.read_bytes()
    refused(capsys, [url, cached, "--format", "official", "--overwrite"], "source")  # its cached copy is the source
    assert cached.read_bytes() == before
