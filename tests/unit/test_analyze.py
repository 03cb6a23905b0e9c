"""`ijepa-scale analyze attention|corrdim|umap|gates` end to end on tiny checkpoints and photo shards:
PNG sizes, the numbers in the tables against direct computations, and every one-line error."""

import dataclasses
import importlib.util
import json
import math
import os
import sys
import types

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ijepa_scale.cli import main
from ijepa_scale.config import config_from_dict
from ijepa_scale.evaluation import analyze
from ijepa_scale.evaluation.analysis import correlation_dimension
from ijepa_scale.models import build_encoder
from ijepa_scale.models.convnext import build_convnext
from ijepa_scale.objectives.gated import GatedConfig, GatedObjective
from tests.helpers.photos import make_photo_shards

NUM_IMAGES = 12


def prefixed(module):
    return {f"module.{k}": v for k, v in module.state_dict().items()}


def base_config(crop=16, patch=4):
    return config_from_dict({"data": {"shards": "x.tar", "crop_size": crop}, "mask": {"patch_size": patch},
                             "meta": {"model_name": "vit_tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
                                      "pred_depth": 1, "pred_emb_dim": 16}}).to_dict()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_photo_shards(folder, sizes=[7, 5], num_classes=3, size=(40, 30), prefix="val")
    return str(folder / "val-{000000..000001}.tar")


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_run")
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    torch.save({"encoder": prefixed(encoder), "target_encoder": prefixed(encoder), "step": 3,
                "config": base_config()}, folder / "jepa-latest.pth.tar")
    return folder


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    """A checkpoint in the format the gated objective saves (student, predictor, target_encoder, config)."""
    folder = tmp_path_factory.mktemp("gated_run")
    config = base_config()
    config["meta"]["objective"] = "gated"
    config["gated"] = dataclasses.asdict(GatedConfig(gate_layer=1, gate_location="skip"))
    torch.manual_seed(1)
    encoder = build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    networks = GatedObjective(GatedConfig(**config["gated"])).build_networks(encoder, pred_depth=1, pred_emb_dim=16)
    with torch.no_grad():  # spread the gate logits so that some gates are open and some closed
        networks["student"].gate.proj.weight.normal_(0, 1.0)
    teacher = build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    path = folder / "jepa-latest.pth.tar"
    torch.save({"student": prefixed(networks["student"]), "predictor": prefixed(networks["predictor"]),
                "target_encoder": prefixed(teacher), "step": 5, "config": config}, path)
    return path


def png_size(path):
    with Image.open(path) as image:
        return image.size


def run(capsys, *argv):
    code = main(["analyze", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_attention_grid_png_and_perplexity_table(shards, vit_run, tmp_path, capsys):
    out = tmp_path / "att"
    code, stdout, _ = run(capsys, "attention", "--checkpoint", vit_run, "--shards", shards, "--out", out,
                          "--layers", "0", "-1", "--num-images", 3, "--scale", 2)
    assert code == 0, stdout
    assert str(out / "attention.png") in stdout and "layers [0, 1], heads [0, 1]" in stdout
    # 3 rows; image + 2 layers x 2 heads = 5 columns of 32 px tiles, 2 px padding, a 14 px header
    assert png_size(out / "attention.png") == (5 * 34 + 2, 3 * 34 + 2 + 14)
    table = pd.read_csv(out / "attention.csv")
    assert list(zip(table["layer"], table["head"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert table["perplexity"].between(1, 16).all()  # 16 tokens: from one key to uniform attention


def test_attention_perplexity_by_hand():
    uniform = torch.full((1, 1, 4, 4), 0.25)
    one_hot = torch.eye(4).reshape(1, 1, 4, 4)
    assert analyze.attention_perplexity(torch.cat([uniform, one_hot], dim=1)).tolist() == pytest.approx([4.0, 1.0])


def test_corrdim_number_png_and_table(shards, vit_run, tmp_path, capsys):
    out = tmp_path / "cd"
    code, stdout, _ = run(capsys, "corrdim", "--checkpoint", vit_run / "jepa-latest.pth.tar", "--shards", shards,
                          "--out", out, "--num-points", 150, "--batch-size", 5)
    assert code == 0
    info = json.loads((out / "corrdim.json").read_text())
    assert info["num_images"] == NUM_IMAGES and info["num_points"] == 150 and info["log_base"] == 10
    assert math.isfinite(info["dimension"]) and 0.5 < info["dimension"] < 32  # width 32
    assert f"correlation dimension {info['dimension']:.3f}" in stdout and "fit over r in [" in stdout
    assert png_size(out / "corrdim.png") == (640, 480)
    curve = pd.read_csv(out / "corrdim.csv")
    assert len(curve) == info["fit_radii"] >= 2 and curve["log10_C"].is_monotonic_increasing
    assert 10 ** curve["log10_r"].iloc[0] == pytest.approx(info["fit_r_min"], rel=1e-4)
    # the same tokens drawn again give the same number
    source = analyze.open_images(shards)
    encoder, size, _ = analyze.load_encoder(vit_run / "jepa-latest.pth.tar", "target_encoder", torch.device("cpu"))
    batches = analyze.read_batches(source, NUM_IMAGES, size, 5, "test")
    points, _, per_image = analyze.sample_tokens(encoder, batches, NUM_IMAGES, 150, torch.device("cpu"),
                                                 torch.Generator().manual_seed(0))
    assert per_image == 16 and "150 patch tokens of 12 images" in stdout
    assert correlation_dimension(points, base=10).dimension == pytest.approx(info["dimension"], rel=1e-9)


def test_corrdim_of_a_convnext_encoder_uses_image_vectors(shards, tmp_path, capsys):
    config = base_config(crop=32)
    config["meta"]["objective"] = "saccade"
    config["saccade"] = {"backbone": "convnext_atto", "embed_dim": 24, "crop_fraction": 1.0}
    torch.manual_seed(0)
    net = build_convnext("convnext_atto", 24)
    path = tmp_path / "saccade.pth.tar"
    torch.save({"student": prefixed(net), "target_encoder": prefixed(net), "config": config}, path)
    code, stdout, _ = run(capsys, "corrdim", "--checkpoint", path, "--shards", shards, "--out", tmp_path / "o")
    assert code == 0 and f"{NUM_IMAGES} image vectors of {NUM_IMAGES} images" in stdout
    code, _, err = run(capsys, "attention", "--checkpoint", path, "--shards", shards, "--out", tmp_path / "o")
    assert code == 2
    assert err.strip() == (f"error: --checkpoint {path}: its target_encoder is a ConvNeXt (saccade.backbone="
                           "convnext_atto), which has no attention maps; `analyze attention` needs a ViT encoder "
                           "(corrdim and umap work here)")


class PrincipalPlane:
    """Stands in for umap.UMAP in the default run (umap-learn compiles with numba for 20-80 s per process):
    the same constructor arguments and fit_transform, giving the top two principal components."""

    calls = []

    def __init__(self, n_neighbors=15, random_state=None):
        PrincipalPlane.calls.append({"n_neighbors": n_neighbors, "random_state": random_state})

    def fit_transform(self, x):
        centred = torch.as_tensor(x) - torch.as_tensor(x).mean(dim=0)
        return (centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:2].T).numpy()


@pytest.mark.parametrize("real", [False, True], ids=["stand-in", "umap-learn"])
def test_umap_scatter_by_class(real, shards, vit_run, tmp_path, capsys, monkeypatch):
    if real and (os.environ.get("IJEPA_TEST_UMAP") != "1" or importlib.util.find_spec("umap") is None):
        pytest.skip("set IJEPA_TEST_UMAP=1 with umap-learn installed (the umap extra) to run the real UMAP "
                    "(numba compiles for 20-80 s)")
    if not real:
        monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=PrincipalPlane))
        PrincipalPlane.calls.clear()
    out = tmp_path / "um"
    code, stdout, _ = run(capsys, "umap", "--checkpoint", vit_run, "--shards", shards, "--out", out,
                          "--n-neighbors", 5, "--seed", 3)
    assert code == 0 and f"umap: {NUM_IMAGES} images, 3 classes" in stdout
    assert png_size(out / "umap.png") == (800, 600)
    points = pd.read_csv(out / "umap.csv")
    assert len(points) == NUM_IMAGES and sorted(points["label"].unique()) == [0, 1, 2]
    assert points[["x", "y"]].notna().all().all() and points["x"].std() > 0
    assert analyze.class_names(shards) == ["class_000", "class_001", "class_002"]
    if real:
        return
    assert PrincipalPlane.calls == [{"n_neighbors": 5, "random_state": 3}]
    # the plotted points are the projection of the standardised mean-pooled features, in reading order
    source = analyze.open_images(shards)
    encoder, size, _ = analyze.load_encoder(vit_run / "jepa-latest.pth.tar", "target_encoder", torch.device("cpu"))
    images = torch.cat([b for b, _ in analyze.read_batches(source, NUM_IMAGES, size, 64, "test")])
    with torch.no_grad():
        features = encoder(analyze.normalized(images, torch.device("cpu"))).mean(dim=1).double()
    features = (features - features.mean(dim=0)) / features.std(dim=0)
    expected = PrincipalPlane().fit_transform(features.numpy())
    assert points[["x", "y"]].to_numpy() == pytest.approx(expected, abs=1e-4)


def test_umap_missing_is_one_line(shards, vit_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    code, _, err = run(capsys, "umap", "--checkpoint", vit_run, "--shards", shards, "--out", tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert "needs umap-learn, which is not installed" in err and "pip install 'ijepa-scale[umap]'" in err


def test_gates_tables_against_direct_computation(shards, gated_run, tmp_path, capsys):
    out = tmp_path / "gates"
    code, stdout, _ = run(capsys, "gates", "--checkpoint", gated_run, "--shards", shards, "--out", out,
                          "--batch-size", 5)
    assert code == 0 and f"gates: {NUM_IMAGES} images" in stdout
    for name, size in (("gate_map.png", (500, 440)), ("open_fraction.png", (600, 400)),
                       ("gate_ablation.png", (600, 400))):
        assert png_size(out / name) == size
    table = pd.read_csv(out / "gates.csv")
    assert table["gates"].tolist() == ["learned", "random", "all_open"]
    assert table["open_fraction"].between(0, 1).all() and (table["loss"] >= 0).all()
    fractions = pd.read_csv(out / "open_fraction.csv")
    assert len(fractions) == NUM_IMAGES and fractions[["real", "noise"]].stack().between(0, 1).all()
    markdown = (out / "gates.md").read_text()
    assert "| learned |" in markdown and "| random |" in markdown and "| all_open |" in markdown

    # direct computation over all images at once
    student, predictor, teacher, size = analyze.load_gated(gated_run, torch.device("cpu"))
    images = torch.cat([b for b, _ in analyze.read_batches(analyze.open_images(shards), NUM_IMAGES, size, 64, "t")])
    x = analyze.normalized(images, torch.device("cpu"))
    with torch.no_grad():
        target = F.layer_norm(teacher(x), (32,))
        prediction = predictor(student.encoder(x))
        all_open = (F.layer_norm(prediction, (32,)) - target).pow(2).sum(-1).mean().item()
        _, gates, log_alpha = student(x)
    probs = torch.sigmoid(log_alpha)
    assert table["loss"].iloc[2] == pytest.approx(all_open, rel=1e-5)
    assert table["open_fraction"].iloc[0] == pytest.approx(gates.mean().item(), abs=1e-6)
    assert 0 < gates.mean().item() < 1  # the fixture's gates are mixed: the closed-token losses mean something
    assert fractions["real"].tolist() == pytest.approx(probs.mean(dim=1).tolist(), abs=1e-6)
    gate_map = pd.read_csv(out / "gate_map.csv").to_numpy()
    assert gate_map.shape == (4, 4)
    assert gate_map.flatten().tolist() == pytest.approx(probs.mean(dim=0).tolist(), abs=1e-6)


@pytest.mark.parametrize("case", ["missing_checkpoint", "no_shards", "layer", "head", "not_gated", "num_images",
                                  "out_is_a_file"])
def test_user_mistakes_are_one_line(case, shards, vit_run, tmp_path, capsys):
    common = ["--checkpoint", vit_run, "--shards", shards, "--out", tmp_path]
    argv, message = {
        "missing_checkpoint": (["corrdim", "--checkpoint", tmp_path / "nope", "--shards", shards, "--out", tmp_path],
                               f"error: --checkpoint {tmp_path / 'nope'}: no such file or folder"),
        "no_shards": (["corrdim", "--checkpoint", vit_run, "--shards", tmp_path / "none-{000000..000001}.tar",
                       "--out", tmp_path],
                      f"error: --shards: shard not found: {tmp_path / 'none-000000.tar'} (and 1 more)"),
        "layer": (["attention", *common, "--layers", "0", "2"],
                  "error: --layers 2: the encoder has 2 blocks; use 0..1 (or -2..-1 counted from the end)"),
        "head": (["attention", *common, "--heads", "-3"],
                 "error: --heads -3: the encoder has 2 heads; use 0..1 (or -2..-1 counted from the end)"),
        "not_gated": (["gates", *common], f"error: --checkpoint {vit_run / 'jepa-latest.pth.tar'}: has "
                      "meta.objective=ijepa; `analyze gates` needs a Gated I-JEPA checkpoint (trained with "
                      "meta.objective=gated)"),
        "num_images": (["umap", *common, "--num-images", "0"], "--num-images must be > 0, got 0"),
        "out_is_a_file": (["corrdim", *common[:4], "--out", tmp_path / "file.txt"],
                          f"error: --out {tmp_path / 'file.txt'}: cannot write there (File exists); pass a writable "
                          "folder"),
    }[case]
    (tmp_path / "file.txt").write_text("keep me")
    if case == "num_images":
        with pytest.raises(SystemExit) as exc:
            main(["analyze", *map(str, argv)])
        assert exc.value.code == 2 and message in capsys.readouterr().err
        return
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.splitlines()[-1] == message and err.count("error:") == 1
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_gated_run_predictor_tokens_and_teacher_attention(shards, gated_run, tmp_path, capsys):
    code, stdout, _ = run(capsys, "corrdim", "--checkpoint", gated_run, "--shards", shards, "--out", tmp_path,
                          "--key", "gated", "--num-points", 100)
    assert code == 0 and f"100 patch tokens of {NUM_IMAGES} images" in stdout  # the predictor's tokens
    assert math.isfinite(json.loads((tmp_path / "corrdim.json").read_text())["dimension"])
    code, _, _ = run(capsys, "attention", "--checkpoint", gated_run, "--shards", shards, "--out", tmp_path,
                     "--num-images", 2, "--heads", 1)
    assert code == 0 and png_size(tmp_path / "attention.png")[0] == 3 * (16 * 7 + 2) + 2
