"""meta.model_name=energy_transformer on 2 CPU ranks: second-order gradients under DDP/FSDP equal one process, and a
main.py run learns and resumes exactly after a stop mid-epoch."""

import os
import subprocess
import sys

import pytest
import torch

from tests.integration.common import ROOT, read_csv, run_main, tiny_config, write_config

pytestmark = pytest.mark.integration


def energy_config(shards, log_dir):
    config = tiny_config(shards, log_dir, meta__model_name="energy_transformer", meta__embed_dim=32,
                         meta__num_heads=2, meta__pred_emb_dim=16)
    del config["meta"]["depth"]
    config["energy"] = {"steps": 2, "hidden_dim": 64, "pred_hidden_dim": 32}
    return config


def test_ddp_and_fsdp_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "grads.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/integration/energy_parallel_run.py"), str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out)
    single = results["single"]["grads"]
    assert len(single) == 25 and all(g.abs().max() > 0 for g in single.values())
    for mode in ("ddp", "fsdp", "fsdp_ac"):
        grads = results[mode]["grads"]
        assert grads.keys() == single.keys()
        for name, expected in single.items():
            assert torch.allclose(grads[name], expected, rtol=1e-4, atol=1e-6 * expected.abs().max()), (mode, name)


def test_main_py_run_learns_and_resumes_exactly_after_a_stop_mid_epoch(shards, tmp_path):
    full_run, run = tmp_path / "full", tmp_path / "resumed"
    proc = run_main(write_config(tmp_path / "full.yaml", energy_config(shards, full_run)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = write_config(tmp_path / "resumed.yaml", energy_config(shards, run))
    proc = run_main(config, "optimization.stop_at_step=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_main(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout

    losses = read_csv(full_run, 0)["loss"].astype(float)
    assert len(losses) == 10 and losses.notna().all() and losses.abs().lt(float("inf")).all()
    assert losses[-3:].mean() < 0.9 * losses[:3].mean()
    for rank in (0, 1):
        full, resumed = read_csv(full_run, rank), read_csv(run, rank)
        assert resumed["step"].tolist() == full["step"].tolist()
        assert resumed["loss"].tolist() == full["loss"].tolist()  # bitwise: same decimal repr
    a = torch.load(full_run / "jepa-latest.pth.tar", weights_only=False)
    b = torch.load(run / "jepa-latest.pth.tar", weights_only=False)
    assert a["config"]["energy"]["steps"] == 2 and "module.block.wq" in a["encoder"]
    for key in ("encoder", "predictor", "target_encoder"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
