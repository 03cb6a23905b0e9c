"""2 CPU ranks (gloo) through main.py on real-photo shards: resume is exact, logs are continuous."""

import os
import subprocess
import sys

import pytest
import torch

from tests.integration.common import (
    ROOT,
    SHARD_SIZES,
    read_csv,
    run_main,
    tiny_config,
    write_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("full")
    config = write_config(log_dir / "c.yaml", tiny_config(shards, log_dir / "run"))
    proc = run_main(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return log_dir / "run", proc


def test_uninterrupted_run_logs_and_checkpoints(uninterrupted):
    run, proc = uninterrupted
    steps_per_epoch = sum(SHARD_SIZES) // (2 * 4)
    for rank in (0, 1):
        frame = read_csv(run, rank)
        assert frame["step"].tolist() == list(range(1, 2 * steps_per_epoch + 1))
        assert frame["epoch"].tolist() == [1] * steps_per_epoch + [2] * steps_per_epoch
        assert frame["itr"].tolist() == list(range(steps_per_epoch)) * 2
        assert (frame["skipped"] == 0).all() and (frame["skipped_steps"] == 0).all()
        assert frame["loss"].astype(float).notna().all()
        assert (frame["mask-A"] > 0).all() and (frame["mask-B"] > 0).all()
    # The logged loss is the global mean, identical on both ranks.
    assert read_csv(run, 0)["loss"].tolist() == read_csv(run, 1)["loss"].tolist()
    names = sorted(p.name for p in run.iterdir())
    assert {"jepa-latest.pth.tar", "jepa-ep1.pth.tar", "jepa-ep2.pth.tar", "params-ijepa.yaml"} <= set(names)
    state = torch.load(run / "jepa-latest.pth.tar", weights_only=False)
    assert state["epoch"] == 2 and state["step"] == 2 * steps_per_epoch and state["world_size"] == 2
    assert all(k.startswith("module.") for k in state["encoder"])
    assert len(state["rank_state"]) == 2
    assert "[ep 1, itr 1/5, step 1]" in proc.stdout


def test_resume_mid_epoch_and_at_epoch_end_equals_uninterrupted(shards, uninterrupted, tmp_path):
    full_run, _ = uninterrupted
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run))
    for stop_at in (3, 3, 5, 7):  # mid-epoch (twice: no extra step), at the epoch end, in epoch 2
        proc = run_main(config, f"optimization.stop_at_step={stop_at}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert torch.load(run / "jepa-latest.pth.tar", weights_only=False)["step"] == stop_at
        assert read_csv(run, 0)["step"].tolist() == list(range(1, stop_at + 1))
        assert "raise or remove optimization.stop_at_step" in proc.stdout and "same command" not in proc.stdout
        if stop_at == 5:  # stopping on the last step of an epoch still writes that epoch's file
            assert torch.load(run / "jepa-ep1.pth.tar", weights_only=False)["step"] == 5
    proc = run_main(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout

    for rank in (0, 1):
        full, resumed = read_csv(full_run, rank), read_csv(run, rank)
        assert resumed["step"].tolist() == full["step"].tolist()  # one header, no gap, no duplicate
        assert resumed["loss"].tolist() == full["loss"].tolist()  # bitwise: same decimal repr
        assert resumed["lr"].tolist() == full["lr"].tolist()
        assert resumed["mask-A"].tolist() == full["mask-A"].tolist()
    a = torch.load(full_run / "jepa-latest.pth.tar", weights_only=False)
    b = torch.load(run / "jepa-latest.pth.tar", weights_only=False)
    for key in ("encoder", "predictor", "target_encoder"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_rerunning_a_complete_run_trains_nothing_and_says_so(uninterrupted, tmp_path):
    run, _ = uninterrupted
    before = [read_csv(run, rank) for rank in (0, 1)]
    proc = run_main(run.parent / "c.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run complete: all 2 epochs (step 10)" in proc.stdout and "optimization.epochs=4" in proc.stdout
    assert "resumed from" not in proc.stdout
    for rank in (0, 1):
        assert read_csv(run, rank).equals(before[rank])


def test_resume_with_other_world_size_mid_epoch_is_refused(shards, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run))
    assert run_main(config, "optimization.stop_at_step=2").returncode == 0
    proc = run_main(config, devices=("cpu",))
    assert proc.returncode != 0
    assert "cannot resume mid-epoch" in proc.stderr and "world size 2 -> 1" in proc.stderr


def test_requested_resume_that_cannot_load_is_an_error(shards, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run, meta__load_checkpoint=True))
    proc = run_main(config)
    assert proc.returncode != 0 and "meta.load_checkpoint=true but there is no jepa-latest" in proc.stderr
    assert not (run / "jepa_r0.csv").exists() or len(read_csv(run, 0)) == 0


def test_torchrun_with_image_folder_layout(tmp_path):
    from tests.helpers.photos import make_photo_folder

    make_photo_folder(tmp_path / "datasets" / "in1k" / "train", num_classes=3, per_class=7, size=(48, 40))
    run = tmp_path / "run"
    config = tiny_config(None, run, optimization__epochs=1)
    config["data"].pop("shards")
    config["data"].update(root_path=str(tmp_path / "datasets"), image_folder="in1k")
    path = write_config(tmp_path / "c.yaml", config)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "main.py"), "--fname", str(path), "--devices", "cpu"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 21 images, 2 ranks x batch 4 -> 2 steps per rank; the loss is the global mean on both ranks.
    frames = [read_csv(run, rank) for rank in (0, 1)]
    assert [f["step"].tolist() for f in frames] == [[1, 2], [1, 2]]
    assert frames[0]["loss"].tolist() == frames[1]["loss"].tolist()
    assert "ImageFolder" in proc.stdout and "3 classes, 21 images" in proc.stdout
