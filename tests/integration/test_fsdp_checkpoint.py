"""FSDP (2 gloo ranks) checkpoints through torch.distributed.checkpoint: exact resume, commit
marker and retention, consolidation for the generic loaders, resume on another world size."""

import shutil

import pytest
import torch

from ijepa_scale.checkpoint.dcp import COMMIT_MARKER, consolidate, read_dcp
from ijepa_scale.config import config_from_dict
from ijepa_scale.distributed.env import DistEnv
from ijepa_scale.models.vision_transformer import VisionTransformer
from ijepa_scale.weights.load import load_encoder
from ijepa_scale.training.trainer import Trainer
from tests.integration.common import read_csv, run_main, tiny_config, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("fsdp_full")
    config = write_config(log_dir / "c.yaml", tiny_config(shards, log_dir / "run", distributed__parallel="fsdp"))
    proc = run_main(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return log_dir / "run"


def assert_same_state(a: dict, b: dict):
    for key in ("encoder", "predictor", "target_encoder"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for i in a["opt"]["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(a["opt"]["state"][i][field]),
                               torch.as_tensor(b["opt"]["state"][i][field])), (i, field)


def test_fsdp_writes_committed_sharded_checkpoints(uninterrupted):
    run = uninterrupted
    latest = run / "jepa-latest.dcp"
    assert latest.is_symlink() and latest.resolve().name == "jepa-ep2.dcp"
    for name in ("jepa-ep1.dcp", "jepa-ep2.dcp"):
        files = {p.name for p in (run / name).iterdir()}
        # one shard file per rank, the metadata, the trainer's progress, and the commit marker
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.pt", COMMIT_MARKER} <= files
    state = consolidate(latest)
    assert state["step"] == 10 and state["epoch"] == 2 and len(state["rank_state"]) == 2
    assert all(k.startswith("module.") for k in state["encoder"])
    assert not list(run.glob("*.pth.tar"))


def test_fsdp_resume_mid_epoch_with_async_saves_equals_uninterrupted(shards, uninterrupted, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(
        shards, run, distributed__parallel="fsdp", checkpoint__async_save=True, checkpoint__every_steps=2,
        checkpoint__keep_last=1))
    proc = run_main(config, "optimization.stop_at_step=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "jepa-latest.dcp").resolve().name == "jepa-latest-step3.dcp"
    # A save that never finished (no marker) is ignored on resume and removed by the next save.
    (run / "jepa-step4.dcp").mkdir()
    (run / "jepa-step4.dcp" / ".metadata").write_bytes(b"partial")
    proc = run_main(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 3" in proc.stdout
    for rank in (0, 1):
        full, resumed = read_csv(uninterrupted, rank), read_csv(run, rank)
        assert resumed["step"].tolist() == full["step"].tolist()
        assert resumed["loss"].tolist() == full["loss"].tolist()  # bitwise: same decimal repr
    assert_same_state(consolidate(run / "jepa-latest.dcp"), consolidate(uninterrupted / "jepa-latest.dcp"))
    # keep_last=1: the newest periodic checkpoint only; no uncommitted or superseded folders remain.
    assert sorted(p.name for p in run.glob("*.dcp")) == ["jepa-ep2.dcp", "jepa-latest.dcp"]


def test_sharded_checkpoint_loads_through_the_generic_loader(uninterrupted):
    folder = uninterrupted / "jepa-latest.dcp"
    loaded = load_encoder(folder, num_heads=3)
    raw = read_dcp(folder)["target_encoder"]
    reference = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    reference.load_state_dict(raw)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), reference.eval()(images))



def test_export_reads_a_sharded_checkpoint_and_its_run_folder(uninterrupted, tmp_path):
    from ijepa_scale.commands.export import main as export_main

    expected = consolidate(uninterrupted / "jepa-latest.dcp")
    for i, source in enumerate((uninterrupted / "jepa-latest.dcp", uninterrupted)):
        out = tmp_path / f"official{i}.pth.tar"
        assert export_main([str(source), str(out), "--format", "official"]) == 0
        official = torch.load(out, weights_only=True)
        for net in ("encoder", "predictor", "target_encoder"):
            assert official[net].keys() == expected[net].keys()
            assert all(torch.equal(official[net][k], v) for k, v in expected[net].items()), net


def test_resume_from_a_two_rank_fsdp_checkpoint_on_one_rank(shards, uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run, symlinks=True)
    raw = tiny_config(shards, run, optimization__epochs=3)
    raw["data"]["num_workers"] = 0
    trainer = Trainer(config_from_dict(raw), DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    try:
        assert trainer.step == 10 and trainer.stream.epoch == 2
        saved = consolidate(run / "jepa-latest.dcp")
        state = trainer.state_dict()
        assert_same_state(state, saved)
    finally:
        trainer.close()


def test_fsdp_skips_a_step_that_is_nan_on_one_rank_and_goes_on(shards, tmp_path):
    import os
    import subprocess
    import sys

    from tests.integration.common import ROOT

    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run, distributed__parallel="fsdp"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "integration" / "nan_run.py"), str(config), "1", "2",
                           "optimization.stop_at_step=3"], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = read_csv(run, 0)
    assert frame["step"].tolist() == [1, 2, 3]
    assert frame["loss"].astype(float).isna().tolist() == [False, True, False]
    assert frame["skipped_steps"].tolist() == [0, 1, 1]
    state = consolidate(run / "jepa-latest.dcp")
    assert state["step"] == 3 and state["counters"]["skipped_steps"] == 1
