"""2 CPU ranks through main.py with W&B (offline) and MLflow (file store): rank 0 logs, a resumed run
continues the same tracker runs, and each store holds one value per step equal to the CSV's."""

import json

import pytest

from ijepa_scale.training.trackers import STATE_FILE
from tests.helpers import trackers as helpers
from tests.helpers.trackers import mlflow_history, wandb_history, wandb_run_ids
from tests.integration.common import read_csv, run_main, tiny_config, write_config

pytestmark = pytest.mark.integration
offline_trackers = helpers.offline_trackers


@pytest.mark.usefixtures("offline_trackers")
def test_two_ranks_stop_and_resume_log_each_step_once(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run, store = tmp_path / "run", (tmp_path / "mlruns").as_uri()
    config = tiny_config(shards, run, optimization__epochs=1, data__num_workers=0)
    config["logging"].update(wandb={"enabled": True, "tags": ["ci"]},
                             mlflow={"enabled": True, "tracking_uri": store, "tags": {"test": "integration"}})
    path = write_config(tmp_path / "c.yaml", config)
    for extra in (["optimization.stop_at_step=2"], []):
        proc = run_main(path, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "tracker failed" not in proc.stdout + proc.stderr
    csv = read_csv(run, 0)
    steps = csv["step"].tolist()
    assert steps == list(range(1, 6))
    loss = dict(zip(steps, csv["loss"].astype(float)))
    mlflow_values, runs = mlflow_history(store, "train/loss")
    for values in (mlflow_values, wandb_history(run / "wandb", "train/loss")):
        assert {s: v for s, v in values.items()} == {s: [pytest.approx(loss[s], rel=1e-6)] for s in steps}
    state = json.loads((run / STATE_FILE).read_text())
    assert len(runs) == 1 and runs[0].data.tags["test"] == "integration"  # rank 1 started no run
    assert wandb_run_ids(run / "wandb") == {state["wandb"]["run_id"]}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # one per session, the same run id
