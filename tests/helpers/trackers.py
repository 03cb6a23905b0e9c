"""Offline W&B and MLflow file stores for the tracker tests, read back with each library's own reader,
and a guard that fails a test whose trackers tried to reach a network."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest


class Listener:
    """A local TCP port that counts connections: set as W&B's server and every proxy, so any HTTP request
    of the W&B service (a separate Go process) lands here instead of the internet."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline with its config and cache in tmp, every proxy and W&B's server pointed at a local
    listener, and this process's non-loopback connects recorded; the test fails if anything tried."""
    listener = Listener()
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(key, listener.url)
    for key in ("NO_PROXY", "no_proxy", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", listener.url)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    outside = []
    connect = socket.socket.connect

    def recording_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            outside.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    yield listener
    listener.close()
    assert not outside, f"a tracker connected to {outside}"
    assert listener.connections == 0, "the W&B service tried to reach a server"


def wandb_history(wandb_dir: Path, metric: str) -> dict[int, list[float]]:
    """step -> every value of `metric` in the offline W&B runs under `wandb_dir` (all sessions), read with
    W&B's own transaction-log reader (`wandb leet inspect --json`)."""
    values: dict[int, list[float]] = {}
    run_dirs = sorted(Path(wandb_dir).glob("offline-run-*"))
    assert run_dirs, f"no offline W&B run in {wandb_dir}"
    for run_dir in run_dirs:
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        for line in out.splitlines():
            record = json.loads(line)
            if record.get("type") == "history":
                item = record["history"]["item"]
                if metric in item:
                    values.setdefault(int(record["history"]["step"]["num"]), []).append(float(item[metric]))
    return values


def wandb_run_ids(wandb_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[1] for p in Path(wandb_dir).glob("offline-run-*")}


def mlflow_history(tracking_uri: str, metric: str) -> tuple[dict[int, list[float]], list]:
    """(step -> every value of `metric`, the runs) of the one experiment's runs, read with MlflowClient."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("ijepa-scale")
    runs = client.search_runs([experiment.experiment_id])
    values: dict[int, list[float]] = {}
    for run in runs:
        for m in client.get_metric_history(run.info.run_id, metric):
            values.setdefault(m.step, []).append(m.value)
    return values, runs
