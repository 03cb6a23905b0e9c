"""logging.wandb / logging.mlflow / logging.tensorboard behind one tracker interface: config errors, one
value per step across a resume, catch-up from the CSV, and a failing tracker that never stops training."""

import importlib.util
import json
import logging
import os
import shutil
import time

import pandas as pd
import pytest

from ijepa_scale.config import ConfigError, apply_overrides, config_from_dict
from ijepa_scale.training.trackers import STATE_FILE, Tracker, Trackers
from ijepa_scale.training.trainer import Trainer
from tests.helpers import trackers as helpers
from tests.helpers.trackers import mlflow_history, wandb_history, wandb_run_ids
from tests.unit.test_launchers import tiny_cfg
from tests.unit.test_trainer_resume import CPU

BASE = {"data": {"shards": "x.tar"}}
offline_trackers = helpers.offline_trackers


@pytest.mark.parametrize("overrides, message", [
    (["logging.wandb.projct=x"], "unknown key 'projct' in logging.wandb; did you mean 'project'?"),
    (["logging.wandb.mode=onlin"], "logging.wandb.mode='onlin' must be one of online, offline"),
    (["logging.wandb.tags=vit"], "logging.wandb.tags must be a list of str, got 'vit'"),
    (["logging.wandb.tags=[" + "x" * 65 + "]"], "must be 1 to 64 characters (a W&B limit)"),
    (["logging.mlflow.experiment="], "logging.mlflow.experiment must not be empty"),
    (["logging.mlflow.tags.team.x=1"], "must look like section.key=value"),
])
def test_bad_tracker_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides(BASE, overrides), "cli")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_nested_keys_load_from_yaml_and_overrides_and_round_trip():
    raw = {**BASE, "logging": {"wandb": {"project": "p", "tags": ["a"]}, "mlflow": {"tags": {"team": "v"}}}}
    cfg = config_from_dict(apply_overrides(raw, ["logging.wandb.run_name=r", "logging.mlflow.tags.size=tiny"]))
    assert (cfg.logging.wandb.project, cfg.logging.wandb.run_name, cfg.logging.wandb.tags) == ("p", "r", ["a"])
    assert cfg.logging.mlflow.tags == {"team": "v", "size": "tiny"}
    assert config_from_dict(cfg.to_dict()).logging == cfg.logging
    with pytest.raises(ConfigError, match="f.yaml: logging.mlflow: unknown key 'trackng_uri' \\(did you mean "
                                          "'tracking_uri'\\?\\)"):
        config_from_dict({**BASE, "logging": {"mlflow": {"trackng_uri": "x"}}}, "f.yaml")


@pytest.mark.parametrize("key, module, install", [
    ("logging.wandb.enabled", "wandb", "pip install wandb (or pip install -e '.[wandb]')"),
    ("logging.mlflow.enabled", "mlflow", "pip install mlflow-skinny (or pip install -e '.[mlflow]')"),
    ("logging.tensorboard", "tensorboard", "pip install tensorboard (or pip install -e '.[tensorboard]')"),
])
def test_an_enabled_tracker_without_its_package_is_refused_at_load(monkeypatch, key, module, install):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides(BASE, [f"{key}=true"]), "cli")
    assert f"{key}=true needs the {module} package: {install}, or set {key}=false" in str(info.value)


def test_a_database_store_needs_the_full_mlflow(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else
                        find_spec(name, *a))
    with pytest.raises(ConfigError, match="logging.mlflow.tracking_uri=sqlite:///m.db is a database store, which "
                                          "needs the full mlflow package: pip install mlflow"):
        config_from_dict(apply_overrides(BASE, ["logging.mlflow.enabled=true",
                                                "logging.mlflow.tracking_uri=sqlite:///m.db"]), "cli")


class Recording(Tracker):
    name = "recording"

    def __init__(self, fail_at=None):
        self.steps, self.fail_at, self.closed = [], fail_at, False

    def open(self, saved, resumed_step):
        if self.fail_at == "open":
            raise ConnectionError("server said no\nsecond line")
        return {"run_id": saved.get("run_id", "r1")}

    def log(self, step, scalars):
        if step == self.fail_at:
            raise RuntimeError("disk quota exceeded")
        self.steps.append((step, scalars))

    def close(self):
        self.closed = True


class Failing(Recording):
    name = "failing"


def write_csv(path, steps):
    path.write_text("step,loss,time (ms),knn_acc\n" + "".join(f"{s},{1.0 / s!r},{10 * s}.5,\n" for s in steps))


def test_a_raising_tracker_warns_once_and_the_others_go_on(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "ijepa_scale")
    groups = {"loss": "train", "time (ms)": "train", "knn_acc": "eval"}
    good, bad, dead = Recording(), Failing(fail_at=2), Failing(fail_at="open")
    dead.name = "dead"
    trackers = Trackers([good, bad, dead], tmp_path, groups, tmp_path / "m.csv", None)
    for step in (1, 2, 3):
        trackers.log({"step": step, "loss": 1.0 / step, "time (ms)": 3.5, "knn_acc": None})
    trackers.close()
    assert [s for s, _ in good.steps] == [1, 2, 3] and [s for s, _ in bad.steps] == [1]
    assert good.steps[0][1] == {"train/loss": 1.0, "train/time_ms": 3.5}  # None and the step itself are not sent
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "dead tracker failed while starting (ConnectionError: server said no second line); training goes on "
        "without it",
        "failing tracker failed while logging step 2 (RuntimeError: disk quota exceeded); training goes on "
        "without it"]
    assert good.closed and not bad.closed
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state == {"recording": {"run_id": "r1", "logged_through": 3}, "failing": {"run_id": "r1",
                                                                                  "logged_through": 1}}


def test_on_resume_a_tracker_skips_logged_steps_and_catches_up_from_the_csv(tmp_path):
    groups = {"loss": "train", "time (ms)": "train"}
    (tmp_path / STATE_FILE).write_text(json.dumps({"recording": {"run_id": "r1", "logged_through": 5},
                                                   "failing": {"run_id": "r1", "logged_through": 1}}))
    write_csv(tmp_path / "m.csv", range(1, 4))  # resumed from step 3; steps 4, 5 were logged before a crash
    ahead, behind = Recording(), Failing()
    trackers = Trackers([ahead, behind], tmp_path, groups, tmp_path / "m.csv", resumed_step=3)
    for step in (4, 5, 6):
        trackers.log({"step": step, "loss": 1.0 / step, "time (ms)": 1.0})
    assert [s for s, _ in ahead.steps] == [6]
    assert [s for s, _ in behind.steps] == [2, 3, 4, 5, 6]
    assert behind.steps[0][1] == {"train/loss": 0.5, "train/time_ms": 20.5}
    # A new run (no checkpoint) starts new tracker runs, whatever trackers.json says.
    fresh = Recording()
    Trackers([fresh], tmp_path, groups, tmp_path / "m.csv", resumed_step=None).log({"step": 1, "loss": 1.0})
    assert [s for s, _ in fresh.steps] == [1]


def tracker_cfg(shards, run, **optimization):
    cfg = tiny_cfg(shards, run, **optimization)
    cfg.data.num_workers = 0
    cfg.checkpoint.every_steps = 2
    cfg.logging.wandb.enabled = cfg.logging.mlflow.enabled = True
    cfg.logging.mlflow.tracking_uri = (run.parent / "mlruns").as_uri()
    return cfg


@pytest.mark.usefixtures("offline_trackers")
def test_wandb_and_mlflow_hold_one_value_per_step_across_a_crash_and_resume(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    trainer = Trainer(tracker_cfg(shards, run, stop_at_step=5), CPU)
    assert trainer.train() is False
    trainer.close()
    # A crash after step 5 whose last checkpoint holds step 4: steps 5 was logged and is trained again.
    os.remove(run / "jepa-latest.pth.tar")
    shutil.copy(run / "jepa-step4.pth.tar", run / "jepa-latest.pth.tar")
    cfg = tracker_cfg(shards, run, stop_at_step=8)
    cfg.logging.tensorboard = True  # enabled on resume: it gets steps 1-4 from the CSV
    trainer = Trainer(cfg, CPU)
    assert trainer.resume_file is not None and trainer.step == 4
    assert trainer.train() is False
    trainer.close()

    csv = pd.read_csv(run / "jepa_r0.csv")
    assert csv["step"].tolist() == list(range(1, 9))
    loss = dict(zip(csv["step"], csv["loss"]))
    mlflow_values, runs = mlflow_history((tmp_path / "mlruns").as_uri(), "train/loss")
    wandb_values = wandb_history(run / "wandb", "train/loss")
    for values in (mlflow_values, wandb_values):
        assert sorted(values) == list(range(1, 9)) and all(len(v) == 1 for v in values.values())
        assert {s: v[0] for s, v in values.items()} == pytest.approx(loss, rel=1e-6)  # resume is exact
    assert len(runs) == 1 and runs[0].info.run_name == "run" and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert params["meta.model_name"] == "vit_tiny" and params["logging.mlflow.enabled"] == "True"
    assert params["optimization.stop_at_step"] == "5"  # MLflow keeps a param's first value
    state = json.loads((run / STATE_FILE).read_text())
    assert wandb_run_ids(run / "wandb") == {state["wandb"]["run_id"]}  # two sessions, one W&B run
    assert state["mlflow"]["run_id"] == runs[0].info.run_id
    assert {t["logged_through"] for t in state.values()} == {8}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(csv["loss"].tolist(), rel=1e-6)


def test_an_unreachable_mlflow_server_is_one_warning_and_training_goes_on(shards, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.WARNING, "ijepa_scale")
    cfg = tracker_cfg(shards, tmp_path / "run", stop_at_step=2)
    cfg.logging.wandb.enabled = False
    cfg.logging.mlflow.tracking_uri = "http://127.0.0.1:9"  # discard port: nothing listens
    began = time.perf_counter()
    trainer = Trainer(cfg, CPU)
    assert trainer.train() is False and trainer.step == 2
    trainer.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow tracker failed while starting (")
    assert warnings[0].endswith("training goes on without it") and "127.0.0.1:9" in warnings[0]
    assert time.perf_counter() - began < 60


def test_a_deleted_mlflow_run_is_replaced_by_a_new_one_that_gets_the_csv(tmp_path, monkeypatch, caplog):
    from ijepa_scale.training.trackers import MlflowTracker
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    caplog.set_level(logging.INFO, "ijepa_scale")
    cfg = config_from_dict(apply_overrides({**BASE, "logging": {"folder": str(tmp_path)}},
                                           ["logging.mlflow.enabled=true"]))
    groups = {"loss": "train", "time (ms)": "train"}
    trackers = Trackers([MlflowTracker(cfg)], tmp_path, groups, tmp_path / "m.csv", None)
    for step in (1, 2, 3):
        trackers.log({"step": step, "loss": 1.0 / step, "time (ms)": 1.0})
    trackers.close()
    store = (tmp_path / "mlruns").as_uri()  # the default: a file store in logging.folder
    old = json.loads((tmp_path / STATE_FILE).read_text())["mlflow"]["run_id"]
    MlflowClient(store).delete_run(old)
    write_csv(tmp_path / "m.csv", range(1, 4))
    trackers = Trackers([MlflowTracker(cfg)], tmp_path, groups, tmp_path / "m.csv", resumed_step=3)
    trackers.log({"step": 4, "loss": 0.25, "time (ms)": 1.0})
    trackers.close()
    new = json.loads((tmp_path / STATE_FILE).read_text())["mlflow"]["run_id"]
    assert new != old and f"mlflow: run {old} is no longer in {store}; starting a new run" in caplog.text
    history = MlflowClient(store).get_metric_history(new, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [m.value for m in MlflowClient(store).get_metric_history(new, "train/time_ms")][:3] == [10.5, 20.5, 30.5]


def test_a_tracker_left_out_of_one_session_keeps_its_run_for_the_next(tmp_path):
    groups = {"loss": "train"}
    write_csv(tmp_path / "m.csv", range(1, 3))
    Trackers([Recording()], tmp_path, groups, tmp_path / "m.csv", None).log({"step": 1, "loss": 1.0})
    Trackers([Failing()], tmp_path, groups, tmp_path / "m.csv", resumed_step=1).log({"step": 2, "loss": 0.5})
    back = Recording()
    Trackers([back], tmp_path, groups, tmp_path / "m.csv", resumed_step=2)
    assert json.loads((tmp_path / STATE_FILE).read_text())["recording"] == {"run_id": "r1", "logged_through": 2}
    assert [s for s, _ in back.steps] == [2]  # caught up from the CSV, step 1 not sent again
