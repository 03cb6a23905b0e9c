"""Experiment trackers on rank 0: TensorBoard, Weights & Biases, MLflow.

Every tracker gets the rows of the rank-0 CSV (the same metrics, named `{group}/{column}`) and, where it
has a place for it, the resolved config. `{logging.folder}/trackers.json` keeps each tracker's run id
and the last step it logged, so a resumed or requeued run continues the same tracker run and logs each
step once: steps up to that mark are not sent again (a resumed run re-trains steps after its checkpoint
that the tracker may already hold), and steps the tracker never got (a tracker enabled on resume, or
one that failed in an earlier attempt) are sent from the CSV when the run resumes. A tracker that
raises is named in one warning and dropped; training goes on without it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterable, Optional

from ..config import Config

logger = logging.getLogger("ijepa_scale")

STATE_FILE = "trackers.json"


def scalar_name(group: str, column: str) -> str:
    """`time (ms)` in group `train` -> `train/time_ms`: a name TensorBoard, W&B and MLflow all accept."""
    return f"{group}/{column.replace(' (', '_').replace(')', '').replace(' ', '_')}"


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """{"logging.wandb.project": "p", ...}: the nested config as MLflow params."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


class Tracker:
    """One tracker. `open` starts or continues its run and returns what to keep in trackers.json for a
    resume (`saved`: what it returned last time with `logged_through`, {} for a new run; `resumed_step`:
    0 for a new run); `log` takes one step's scalars."""

    name = ""

    def open(self, saved: dict, resumed_step: int) -> dict:
        """A tracker with its own run returns its `run_id`; one without may return `logged_through`."""
        raise NotImplementedError

    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Many steps at once (the catch-up from the CSV on resume)."""
        for step, scalars in rows:
            self.log(step, scalars)

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in `{folder}/tensorboard`."""

    name = "tensorboard"

    def __init__(self, folder: Path):
        self.folder = folder

    def open(self, saved: dict, resumed_step: int) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        # Readers drop the events of steps >= purge_step written before: those of an earlier run in this
        # folder, or of steps logged after the checkpoint a run resumed from (logged again from here).
        kept = min(saved.get("logged_through", 0), resumed_step)
        self.writer = SummaryWriter(log_dir=str(self.folder / "tensorboard"), purge_step=kept + 1)
        return {"logged_through": kept}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, cfg: Config):
        self.settings, self.folder, self.config = cfg.logging.wandb, Path(cfg.logging.folder), cfg.to_dict()

    def open(self, saved: dict, resumed_step: int) -> dict:
        import wandb

        s = self.settings
        run_id = saved.get("run_id")
        Path(s.dir or self.folder).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=s.project, entity=s.entity, name=s.run_name or self.folder.resolve().name, tags=s.tags or None,
            dir=str(Path(s.dir or self.folder)), mode=s.mode, id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.config.update(self.config, allow_val_change=True)  # a resumed run's: as it is now
        return {"run_id": self.run.id}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


# A tracking server that does not answer costs one step at most this long before the tracker is dropped
# (MLflow's own defaults retry for minutes); the environment variables still win.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MLFLOW_BATCH = (100, 1000)  # params, metrics per log_batch call (MLflow's limits)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, cfg: Config):
        self.settings, self.folder, self.config = cfg.logging.mlflow, Path(cfg.logging.folder), cfg.to_dict()
        uri = self.settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = uri or (self.folder.resolve() / "mlruns").as_uri()

    def _is_file_store(self) -> bool:
        return "://" not in self.uri or self.uri.startswith("file:")

    def open(self, saved: dict, resumed_step: int) -> dict:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if self._is_file_store():  # chosen in the config; MLflow 3 asks for this opt-in to use its file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = saved.get("run_id") if saved.get("tracking_uri") == self.uri else None
        existing: dict[str, str] = {}
        if self.run_id is not None:
            existing = self._params_of_saved_run()
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            s = self.settings
            experiment = self.client.get_experiment_by_name(s.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(s.experiment)
            run = self.client.create_run(experiment_id, run_name=s.run_name or self.folder.resolve().name,
                                         tags=dict(s.tags))
            self.run_id = run.info.run_id
        self._log_params(existing)
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def _params_of_saved_run(self) -> dict[str, str]:
        """The saved run's params; a run deleted from the store is forgotten (self.run_id = None)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(self.run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            logger.warning("mlflow: run %s is no longer in %s; starting a new run", self.run_id, self.uri)
            self.run_id = None
            return {}
        return run.data.params

    def _log_params(self, existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        params = _flat(self.config)
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:  # MLflow keeps a param's first value
            logger.info("mlflow: the run's params keep their first values; changed since: %s", ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MLFLOW_BATCH[0]):
            self.client.log_batch(self.run_id, params=new[i:i + MLFLOW_BATCH[0]])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.log_rows([(step, scalars)])

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for step, scalars in rows for name, value in scalars.items()]
        for i in range(0, len(metrics), MLFLOW_BATCH[1]):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MLFLOW_BATCH[1]])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """Rank 0's trackers behind one call per step; does nothing when none is configured."""

    def __init__(self, trackers: list[Tracker], folder: Path, groups: dict[str, str], csv_path: Path,
                 resumed_step: Optional[int]):
        """`groups`: CSV column -> group of its scalar name; `resumed_step`: None for a new run."""
        self.groups, self.state_path = groups, folder / STATE_FILE
        saved = self._read_state() if resumed_step is not None else {}
        self.state: dict[str, dict] = dict(saved)  # a tracker left out this time keeps its run for a later resume
        self.trackers: list[Tracker] = []
        for tracker in trackers:
            before = saved.get(tracker.name, {})
            entry = self._call(tracker, "starting", lambda: tracker.open(before, resumed_step or 0))
            if entry is None:
                continue
            if "logged_through" not in entry:  # the same run continues from its last logged step, a new one from 0
                same = entry.get("run_id") == before.get("run_id")
                entry["logged_through"] = before.get("logged_through", 0) if same else 0
            self.state[tracker.name] = entry
            self.trackers.append(tracker)
            if entry.get("run_id") == before.get("run_id") and before:
                logger.info("%s: continuing run %s after step %d", tracker.name, entry["run_id"],
                            entry["logged_through"])
            elif entry.get("run_id"):
                logger.info("%s: new run %s", tracker.name, entry["run_id"])
        if self.trackers:
            self._write_state()
            if resumed_step:
                self._catch_up(csv_path, resumed_step)

    @classmethod
    def from_config(cls, cfg: Config, folder: Path, groups: dict[str, str], csv_path: Path,
                    resumed_step: Optional[int]) -> "Trackers":
        trackers: list[Tracker] = []
        if cfg.logging.tensorboard:
            trackers.append(TensorBoardTracker(folder))
        if cfg.logging.wandb.enabled:
            trackers.append(WandbTracker(cfg))
        if cfg.logging.mlflow.enabled:
            trackers.append(MlflowTracker(cfg))
        return cls(trackers, folder, groups, csv_path, resumed_step)

    def _read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("%s is unreadable (%s): the trackers start new runs", self.state_path, exc)
            return {}
        return state if isinstance(state, dict) else {}

    def _write_state(self) -> None:
        # No fsync: this is written every step; a mark lost in a machine crash only repeats a few steps.
        tmp = self.state_path.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)

    def _call(self, tracker: Tracker, doing: str, call):
        """`call()`'s result, or None once `tracker` raised (it is then dropped with one warning)."""
        try:
            return call()
        except Exception as exc:  # a tracker never stops training
            cause = " ".join(str(exc).split())
            logger.warning("%s tracker failed while %s (%s%s); training goes on without it", tracker.name, doing,
                           type(exc).__name__, f": {cause[:300]}" if cause else "")
            if tracker in self.trackers:
                self.trackers.remove(tracker)
            return None

    def _scalars(self, row: dict) -> dict[str, float]:
        out = {}
        for column, group in self.groups.items():
            value = row.get(column)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[scalar_name(group, column)] = value
        return out

    def _catch_up(self, csv_path: Path, through: int) -> None:
        """Send each tracker the CSV's steps it has not logged, up to the resumed step."""
        behind = [t for t in self.trackers if self.state[t.name]["logged_through"] < through]
        if not behind:
            return
        try:
            rows = list(_csv_rows(csv_path))
        except OSError as exc:
            logger.warning("cannot read %s to send the trackers its earlier steps (%s)", csv_path, exc)
            return
        for tracker in behind:
            mark = self.state[tracker.name]["logged_through"]
            missing = [(step, self._scalars(row)) for step, row in rows if mark < step <= through]
            if missing and self._call(tracker, f"logging steps {missing[0][0]}-{missing[-1][0]} from {csv_path.name}",
                                      lambda: tracker.log_rows(missing) or True):
                logger.info("%s: logged steps %d-%d from %s", tracker.name, missing[0][0], missing[-1][0],
                            csv_path.name)
                self.state[tracker.name]["logged_through"] = missing[-1][0]
        self._write_state()

    def log(self, row: dict) -> None:
        """One step's CSV row (column -> value)."""
        if not self.trackers:
            return
        step, scalars = row["step"], self._scalars(row)
        for tracker in list(self.trackers):
            if step > self.state[tracker.name]["logged_through"] and self._call(
                    tracker, f"logging step {step}", lambda: tracker.log(step, scalars) or True):
                self.state[tracker.name]["logged_through"] = step
        self._write_state()

    def close(self) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, "closing", tracker.close)
        self.trackers = []


def _csv_rows(path: Path) -> Iterable[tuple[int, dict]]:
    """(step, {column: float or None}) of each complete row of a metrics CSV."""
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(row["step"])
            except (KeyError, TypeError, ValueError):
                continue  # a half-written last line

            def number(text):
                try:
                    return float(text) if text not in ("", None) else None
                except ValueError:
                    return None

            yield step, {column: number(text) for column, text in row.items()}
