"""`ijepa-scale eval` on 2 gloo ranks (also few-shot and baseline rows on Fashion-MNIST), and periodic k-NN
during a 2-rank run that stops and resumes."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from ijepa_scale.config import config_from_dict
from ijepa_scale.data import fashion_mnist
from ijepa_scale.models import build_encoder
from tests.helpers.photos import make_photo_shards
from tests.integration.common import ROOT, make_shards, read_csv, run_main, tiny_config, write_config

pytestmark = pytest.mark.integration


def run_eval(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", "ijepa_scale.cli", "eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    train = make_shards(folder / "train")
    make_photo_shards(folder / "val", sizes=[9, 8], num_classes=4, size=(48, 40), seed=5, prefix="val")
    return train, str(folder / "val" / "val-{000000..000001}.tar")


@pytest.fixture(scope="module")
def evaluated_run(data, tmp_path_factory):
    """2 ranks, k-NN every 3 steps and every epoch, stopped at step 4 and resumed; and the same uninterrupted."""
    train, val = data
    runs = {}
    for name, stops in (("full", ()), ("resumed", (4,))):
        folder = tmp_path_factory.mktemp(name)
        config = tiny_config(train, folder / "run", evaluation__every_steps=3, evaluation__every_epochs=1)
        config["evaluation"].update(train_shards=train, val_shards=val)
        path = write_config(folder / "c.yaml", config)
        procs = [run_main(path, f"optimization.stop_at_step={s}") for s in stops] + [run_main(path)]
        for proc in procs:
            assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (folder / "run", procs[-1])
    return runs


def test_periodic_knn_is_logged_by_rank_0_and_resume_stays_exact(evaluated_run):
    (full, proc), (resumed, _) = evaluated_run["full"], evaluated_run["resumed"]
    frame = read_csv(full, 0)
    # 5 steps per epoch: steps 3, 5 (epoch end), 6 and 9, 10 (epoch end).
    assert frame.loc[frame["knn_acc"].notna(), "step"].tolist() == [3, 5, 6, 9, 10]
    assert frame["knn_acc"].dropna().between(0, 1).all()
    assert read_csv(full, 1)["knn_acc"].isna().all()  # a column on every rank, filled on rank 0 only
    for name in ("pred_norm", "target_std", "eff_rank"):
        assert (frame[name] > 0).all()
    # The metrics are global means: the same on both ranks.
    assert frame["pred_norm"].tolist() == read_csv(full, 1)["pred_norm"].tolist()
    assert "knn_acc" in proc.stdout and "pred_norm" in proc.stdout
    again = read_csv(resumed, 0)
    for column in ("step", "loss", "pred_norm", "eff_rank"):
        assert again[column].tolist() == frame[column].tolist(), column
    assert again["knn_acc"].round(12).tolist() == pytest.approx(frame["knn_acc"].round(12).tolist(), nan_ok=True)
    a = torch.load(full / "jepa-latest.pth.tar", weights_only=True)
    b = torch.load(resumed / "jepa-latest.pth.tar", weights_only=True)
    for name in a["target_encoder"]:
        assert torch.equal(a["target_encoder"][name], b["target_encoder"][name]), name


def test_eval_command_on_two_ranks(data, evaluated_run):
    train, val = data
    run, _ = evaluated_run["full"]
    two = run_eval("both", "--checkpoint", str(run), "--train-shards", train, "--val-shards", val,
                   "--devices", "cpu", "cpu", "--random-init", "--batch-size", "8")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "val features: 17/17" in two.stderr and "img/s, ETA" in two.stderr
    rows = pd.read_csv(run / "eval.csv")
    assert rows["method"].tolist() == ["linear", "knn"] * 2
    assert rows["key"].tolist() == ["target_encoder"] * 2 + ["target_encoder (random init)"] * 2
    assert (rows["step"] == 10).all() and (rows["n_train"] == 43).all() and (rows["n_val"] == 17).all()
    assert rows["accuracy"].between(0, 1).all()
    assert "target_encoder (random init)" in two.stdout and "appended 4 row(s)" in two.stdout
    # The periodic k-NN at the last step saw the same features as the command's 2-rank k-NN.
    last_knn = read_csv(run, 0)["knn_acc"].dropna().iloc[-1]
    assert rows.loc[1, "accuracy"] == pytest.approx(last_knn, abs=1e-6)


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_SOURCE_DIR),
                    reason="needs the Debian package dataset-fashion-mnist (launch/setup_env.sh installs it)")
def test_few_shot_and_baseline_rows_on_fashion_mnist(tmp_path):
    fashion_mnist.make_fashion_mnist_shards(tmp_path / "data", split="train", num_shards=2, per_class=12)
    fashion_mnist.make_fashion_mnist_shards(tmp_path / "data", split="test", num_shards=1, per_class=10)
    cfg = config_from_dict({"data": {"shards": "x.tar", "crop_size": 28}, "mask": {"patch_size": 7},
                            "meta": {"model_name": "vit_tiny", "embed_dim": 32, "depth": 1, "num_heads": 2}})
    torch.manual_seed(3)
    encoder = build_encoder("vit_tiny", img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2)
    (tmp_path / "run").mkdir()
    torch.save({"target_encoder": encoder.state_dict(), "step": 5, "config": cfg.to_dict()},
               tmp_path / "run" / "jepa-latest.pth.tar")
    proc = run_eval("both", "--checkpoint", str(tmp_path / "run"), "--devices", "cpu", "cpu",
                    "--train-shards", str(tmp_path / "data" / "fmnist-train-{000000..000001}.tar"),
                    "--val-shards", str(tmp_path / "data" / "fmnist-test-000000.tar"),
                    "--shots", "1,4", "--seeds", "3", "--baselines", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "appended 18 row(s)" in proc.stdout and "probes (rank 0's" in proc.stderr
    rows = pd.read_csv(tmp_path / "run" / "eval.csv", keep_default_na=False)
    keys = ["target_encoder", "target_encoder (random init)", "raw pixels"]
    assert rows["key"].tolist() == [k for k in keys for _ in range(6)]
    assert rows["shots"].astype(str).tolist() == ["", "", "1", "1", "4", "4"] * 3
    assert rows["method"].tolist() == ["linear", "knn"] * 9
    assert (rows["n_val"] == 100).all() and rows["n_train"].tolist() == [120, 120, 10, 10, 40, 40] * 3
    shot_rows = rows[rows["shots"] != ""]
    assert (shot_rows["seeds"] == "3").all() and (shot_rows["accuracy_std"].astype(float) >= 0).all()
    assert rows["accuracy"].between(0, 1).all()
    linear_all = rows[(rows["shots"] == "") & (rows["method"] == "linear")]
    assert (linear_all["l2_grid"] != "").all() and (linear_all["l2"] != "").all()
    # Fashion-MNIST's raw pixels are far above chance (10 %) even from 4 labelled images per class.
    raw = rows[rows["key"] == "raw pixels"].set_index(["method", "shots"])["accuracy"]
    assert raw[("knn", "")] > 0.5 and raw[("linear", "4")] > 0.4
    assert (rows.loc[rows["key"] == "raw pixels", "pool"] == "").all()
