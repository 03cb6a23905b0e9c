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


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error")]


def test_a_short_http_outage_costs_nothing(tmp_path):
    from tests.helpers.servers import OutageServer

    folder = tmp_path / "shards"
    shards = make_shards(folder)
    local = tmp_path / "local"
    proc = run_main(write_config(tmp_path / "local.yaml", tiny_config(shards, local)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The server goes away after its 3rd shard (mid epoch 1) and is back 4 s later; the retries wait
    # 0.5 + 1 + 2 + 4 s at most before the 5th attempt.
    server = OutageServer(folder, down_after=3, down_s=4)
    try:
        remote = tmp_path / "http"
        config = tiny_config(f"{server.url}/train-{{000000..000004}}.tar", remote)
        config["data"].update(read_attempts=8, retry_backoff_s=0.5)
        proc = run_main(write_config(tmp_path / "http.yaml", config))
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(server.outages) == 1 and server.outages[0][1] is not None
    assert "connection refused by 127.0.0.1" in proc.stderr and "retry 1/7" in proc.stderr
    for rank in (0, 1):
        a, b = read_csv(local, rank), read_csv(remote, rank)
        assert len(a) == 10 and a["step"].tolist() == b["step"].tolist()
        assert a["loss"].tolist() == b["loss"].tolist()  # the same samples in the same order, bit for bit
        assert b["skipped"].iloc[-1] == 0 and b["skipped_steps"].iloc[-1] == 0


def test_an_http_outage_past_the_retries_stops_with_one_line_naming_the_source(tmp_path):
    from tests.helpers.servers import OutageServer

    folder = tmp_path / "shards"
    shards_pattern = "train-{000000..000004}.tar"
    make_shards(folder)
    server = OutageServer(folder, down_after=3)  # gone for good after its 3rd shard
    try:
        run = tmp_path / "run"
        config = tiny_config(f"{server.url}/{shards_pattern}", run)
        config["data"].update(read_attempts=3, retry_backoff_s=0.2)
        proc = run_main(write_config(tmp_path / "c.yaml", config))
    finally:
        server.close()
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    host = server.url[len("http://"):]
    assert errors[0].startswith("error: rank ") and f": data unavailable: {server.url}/train-" in errors[0]
    assert (f"(host {host}): connection refused by {host}, 3 attempt(s) over" in errors[0]
            and "data.read_attempts=3, data.retry_backoff_s=0.2, data.read_timeout_s=" in errors[0]), errors[0]
    assert "consecutive skipped steps" not in proc.stderr and "Traceback" not in proc.stderr
    for rank in (0, 1):
        frame = read_csv(run, rank)
        assert frame["loss"].astype(float).notna().all() and (frame["skipped_steps"] == 0).all()


def test_a_closed_port_at_start_up_says_connection_refused(tmp_path):
    from tests.helpers.servers import closed_port

    port = closed_port()
    config = tiny_config(f"http://127.0.0.1:{port}/train-{{000000..000004}}.tar", tmp_path / "run")
    config["data"].update(read_attempts=2, retry_backoff_s=0.1)
    proc = run_main(write_config(tmp_path / "c.yaml", config))
    errors = error_lines(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert f"connection refused by 127.0.0.1:{port}" in errors[0] and "shard not found" not in errors[0]
    assert "check data.shards" in errors[0]
