"""2-rank runs through main.py on damaged and remote shards."""

from __future__ import annotations

import pytest

from tests.helpers.shards import truncate
from tests.integration.common import make_shards, read_csv, run_main, tiny_config, write_config

pytestmark = pytest.mark.integration


def test_truncated_shard_without_index_trains_warns_once_and_counts(tmp_path):
    folder = tmp_path / "shards"
    shards = make_shards(folder)
    (folder / "train-index.json").unlink()
    truncate(folder / "train-000002.tar", (folder / "train-000002.tar").stat().st_size // 2)
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, run, optimization__epochs=1))
    proc = run_main(config)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    warned = [line for line in output.splitlines() if "train-000002.tar is damaged after" in line]
    assert len(warned) == 1, output[-3000:]
    assert int(read_csv(run, 0)["skipped"].iloc[-1]) == 1 and int(read_csv(run, 1)["skipped"].iloc[-1]) == 0
    assert len(read_csv(run, 0)) >= 3  # trained on what remains (>= 32 + half of 11 samples)

    proc = run_main(config, "data.on_error=fail", f"logging.folder={tmp_path / 'strict'}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "train-000002.tar" in errors[0] and "data.on_error=skip" in errors[0] and "Traceback" not in proc.stderr


def test_training_on_s3_shards_logs_the_same_steps_and_losses_as_local(tmp_path):
    from tests.helpers.servers import s3_server, upload

    folder = tmp_path / "shards"
    shards = make_shards(folder)
    local = tmp_path / "local"
    proc = run_main(write_config(tmp_path / "local.yaml", tiny_config(shards, local, optimization__epochs=1)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with s3_server():
        upload(folder, "s3://data/in1k")
        remote = tmp_path / "s3"
        config = tiny_config("s3://data/in1k/train-{000000..000004}.tar", remote, optimization__epochs=1)
        proc = run_main(write_config(tmp_path / "s3.yaml", config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        a, b = read_csv(local, rank), read_csv(remote, rank)
        assert len(a) == 5 and a["step"].tolist() == b["step"].tolist()
        assert a["loss"].tolist() == b["loss"].tolist()  # the same samples in the same order, bit for bit
        assert b["skipped"].iloc[-1] == 0
