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
from tests.integration.common import ROOT, child_env, make_shards, read_csv, run_main, tiny_config, write_config

pytestmark = pytest.mark.integration
NAN_RUN = ROOT / "tests" / "integration" / "nan_run.py"


def run_nan(config, bad_rank, steps, *overrides, timeout=180):
    env = child_env()
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
    assert "a non-finite loss or no decodable sample on rank(s) 1; update skipped" in proc.stdout + proc.stderr
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
    assert "the last for a non-finite loss or no decodable sample on rank(s) 1." in proc.stderr
    # One warning per skipped step (rank 0 speaks for all), and the CSV ends at the step the error names.
    assert (proc.stdout + proc.stderr).count("update skipped on every rank") == 2
    assert read_csv(run, 0)["step"].tolist()[-1] == 3


def test_a_dying_rank_stops_the_others_and_main_exits_nonzero(shards, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run, optimization__epochs=50))
    env = child_env()
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
    for rank in (0, 1):  # each cause once, however many steps lost samples to it
        causes = [line for line in proc.stderr.splitlines() if line.startswith(f"[rank {rank}]") and "skipped" in line
                  and "train-000003.tar" in line]
        assert len(causes) <= 1, causes
    assert "non-finite loss or no decodable sample" not in proc.stderr

    proc = run_main(config, "data.on_error=fail", f"logging.folder={tmp_path / 'strict'}")
    assert proc.returncode == 1
    # One line from the rank that read the bad shard, not its peer's broken-collective error.
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "data.on_error=fail" in errors[0] and ".tar" in errors[0], proc.stderr[-3000:]
    assert errors[0].startswith("error: rank ") and "Traceback" not in proc.stderr


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def test_unwritable_logging_folder_is_refused_before_the_ranks_start(shards, tmp_path):
    (tmp_path / "a_file").write_text("")
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, tmp_path / "a_file" / "run"))
    proc = run_main(config, timeout=120)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        f"error: logging.folder={tmp_path / 'a_file' / 'run'}: cannot create or write there (Not a directory); "
        f"choose a writable logging.folder"]


@pytest.mark.parametrize("devices", [("cpu",), ("cpu", "cpu")])
def test_a_run_refused_at_start_up_leaves_no_folder_it_created(tmp_path, devices):
    run = tmp_path / "new" / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config("/nowhere/train-{000000..000001}.tar", run))
    proc = run_main(config, devices=devices, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == ["error: shard not found: /nowhere/train-000000.tar (and 1 more); check "
                                        "data.shards='/nowhere/train-{000000..000001}.tar', which expands to 2 "
                                        "shard(s)"]
    assert not (tmp_path / "new").exists()


def test_resume_into_another_architecture_is_one_line_printed_once(shards, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run))
    assert run_main(config, "optimization.stop_at_step=1").returncode == 0
    params = (run / "params-ijepa.yaml").read_text()

    proc = run_main(config, "meta.depth=3")
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        f"error: {run / 'jepa-latest.pth.tar'} has encoder depth 2, the config asks for 3 (meta.depth) (it was "
        f"trained with meta.model_name=vit_tiny). Resume with the checkpoint's model settings, or start a new "
        f"logging.folder"], proc.stderr[-3000:]
    assert (run / "params-ijepa.yaml").read_text() == params  # the refused run did not overwrite it


def test_a_diverged_loss_stops_with_one_line(shards, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, tmp_path / "run"))
    proc = run_main(config, "optimization.lr=1e30", "optimization.start_lr=1e30",
                    "optimization.max_consecutive_nonfinite=2")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 consecutive skipped steps" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs: room for the CSVs and params-ijepa.yaml, not for a checkpoint."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_is_one_line_naming_the_file(shards, tmp_path, tiny_disk):
    run = tiny_disk / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run))
    proc = run_main(config, "optimization.stop_at_step=1")
    assert proc.returncode == 1
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: cannot write checkpoint {run / 'jepa-latest.pth.tar'}: no space "
                                f"left on device (") and "MB free in" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not any(".tmp-" in p.name for p in run.iterdir())  # no partial file left behind
