"""Failure paths with 2 gloo ranks: NaN steps, a dying rank, corrupt shards."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from tests.helpers.shards import NOT_A_JPEG, replace_member, truncate
from tests.integration.common import ROOT, make_shards, read_csv, run_main, tiny_config, write_config

pytestmark = pytest.mark.integration
NAN_RUN = ROOT / "tests" / "integration" / "nan_run.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def run_nan(config, bad_rank, steps, *overrides, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(NAN_RUN), str(config), str(bad_rank), steps, *overrides],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_nan_on_one_rank_skips_the_step_on_every_rank(shards, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run))
    proc = run_nan(config, 1, "999", "optimization.stop_at_step=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = torch.load(run / "jepa-latest.pth.tar", weights_only=False)
    # Step 3 is NaN on rank 1 only; rank 0's loss is finite, yet no rank may update.
    proc = run_nan(config, 1, "3", "optimization.stop_at_step=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = torch.load(run / "jepa-latest.pth.tar", weights_only=False)
    assert after["step"] == 3
    for key in ("encoder", "predictor", "target_encoder"):
        for name, tensor in before[key].items():
            assert torch.equal(tensor, after[key][name]), f"{key}.{name} changed on a skipped step"
    assert "non-finite loss or undecodable batch on rank(s) [1]" in proc.stdout + proc.stderr
    for rank in (0, 1):
        frame = read_csv(run, rank)
        row = frame[frame["step"] == 3].iloc[0]
        assert pd.isna(row["loss"]) and row["skipped_steps"] == 1
    # Training goes on normally afterwards.
    proc = run_nan(config, 1, "999", "optimization.stop_at_step=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = read_csv(run, 0)
    assert frame["step"].tolist() == [1, 2, 3, 4, 5]
    assert frame["loss"].astype(float).iloc[3:].notna().all()


def test_consecutive_nan_steps_stop_the_run_naming_step_and_rank(shards, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run, optimization__max_consecutive_nonfinite=2))
    proc = run_nan(config, 1, "2,3,4")
    assert proc.returncode != 0
    assert "2 consecutive skipped steps" in proc.stderr and "ending at step 3" in proc.stderr
    assert "rank(s) [1]" in proc.stderr


def test_a_dying_rank_stops_the_others_and_main_exits_nonzero(shards, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run, optimization__epochs=50))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    main = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--fname", str(config), "--devices", "cpu", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "jepa_r1.csv").exists():
            time.sleep(0.5)
        time.sleep(2)
        children = subprocess.run(["pgrep", "-P", str(main.pid)], capture_output=True, text=True).stdout.split()
        ranks = [int(pid) for pid in children
                 if "spawn_main" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")]
        assert len(ranks) == 2, children
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = main.communicate(timeout=90)
    finally:
        if main.poll() is None:
            main.kill()
    assert main.returncode != 0
    assert "rank 1" in stderr and "SIGKILL" in stderr or "exited with code -9" in stderr
    for pid in ranks:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def damage_shards(folder):
    """An undecodable image in shard 0 and shard 3 cut short."""
    replace_member(folder / "train-000000.tar", "000000_000002", "jpg", NOT_A_JPEG)
    truncate(folder / "train-000003.tar", 700)


def test_corrupt_data_is_skipped_counted_and_logged(tmp_path):
    folder = tmp_path / "shards"
    shards = make_shards(folder)
    damage_shards(folder)
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run, optimization__epochs=1))
    proc = run_main(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total_skipped = sum(int(read_csv(run, rank)["skipped"].iloc[-1]) for rank in (0, 1))
    # 1 bad image + the 3 samples of the truncated shard; some may fall in the dropped remainder.
    assert 1 <= total_skipped <= 4
    assert "train-000003.tar" in proc.stdout + proc.stderr or "train-000000.tar" in proc.stdout + proc.stderr
    assert "skipped" in proc.stdout + proc.stderr

    proc = run_main(config, "data.on_error=fail", f"logging.folder={tmp_path / 'strict'}")
    assert proc.returncode != 0
    assert "data.on_error=fail" in proc.stderr and ".tar" in proc.stderr
