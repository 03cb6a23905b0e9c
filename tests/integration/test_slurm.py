"""main_distributed.py on a real SLURM with accounting (launch/slurm/local_cluster.sh): 1 node x 2 CPU tasks.

Skipped, with the reason, where `sbatch` is absent; CI sets IJEPA_REQUIRE_SLURM=1, which turns
that skip into a failure.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.slurm import state_dir
from tests.integration.common import ROOT, SHARD_SIZES, make_shards, read_csv, tiny_config, write_config

pytestmark = pytest.mark.integration

PARTITION = os.environ.get("IJEPA_SLURM_PARTITION", "debug")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
# Batch 1 on 2 ranks: 21 steps per epoch, so a signal a few steps in lands mid-epoch.
STEPS_PER_EPOCH = sum(SHARD_SIZES) // 2
EPOCHS = 3


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer"
    if out.returncode != 0 or not re.search(r"idle|mixed|alloc", out.stdout):
        return f"no SLURM partition {PARTITION!r} with a usable node ({(out.stdout + out.stderr).strip()})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem is not None:
        if os.environ.get("IJEPA_REQUIRE_SLURM") == "1":
            pytest.fail(f"IJEPA_REQUIRE_SLURM=1 but {problem}: the SLURM tests must run here "
                        "(bash launch/slurm/local_cluster.sh start)")
        pytest.skip(f"{problem}: start a local cluster with `bash launch/slurm/local_cluster.sh start`")


@pytest.fixture(scope="module")
def shards(cluster, tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def submit(*args, check=True) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    cmd = [sys.executable, str(ROOT / "main_distributed.py"), "--preset", "local-cpu", "--partition", PARTITION,
           "--tasks-per-node", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, re.findall(r"^submitted job (\S+)", proc.stdout, flags=re.M)


def sacct_states(job_id: str, duplicates: bool = False) -> list[str]:
    cmd = ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"] + (["-D"] if duplicates else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def wait_done(job_id: str, log: Path, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = sacct_states(job_id)
        if states and states[-1].startswith(TERMINAL):
            return states[-1]
        time.sleep(1)
    subprocess.run(["scancel", job_id.split("_")[0]], timeout=30)
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    pytest.fail(f"job {job_id} not finished after {timeout} s (sacct: {sacct_states(job_id)}); log:\n{tail}")


def wait_rows(csv_path: Path, rows: int, job_id: str, log: Path, timeout: float = 180) -> None:
    deadline, next_check = time.time() + timeout, 0.0
    while time.time() < deadline:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) > rows:
            return
        if time.time() > next_check:
            states = sacct_states(job_id)
            if states and states[-1].startswith(TERMINAL):
                pytest.fail(f"job {job_id} ended ({states[-1]}) before {rows} steps; log:\n{log.read_text()[-3000:]}")
            next_check = time.time() + 2
        time.sleep(0.05)
    pytest.fail(f"{csv_path} did not reach {rows} rows in {timeout} s")


def weights(run: Path) -> dict:
    return torch.load(run / "jepa-latest.pth.tar", weights_only=False)


@pytest.fixture(scope="module")
def two_runs(shards, tmp_path_factory):
    """The same config twice at once: one left alone, one preempted with USR2 a few steps in."""
    base = tmp_path_factory.mktemp("slurm")
    config = write_config(base / "tiny.yaml", tiny_config(shards, base / "full", data__batch_size=1,
                                                          optimization__epochs=EPOCHS))
    folder = base / "submitit"
    full_proc, full_ids = submit("--fname", config, "--folder", folder)
    pre_proc, pre_ids = submit("--fname", config, "--folder", folder, f"logging.folder={base / 'preempted'}")
    full_id, pre_id = full_ids[0], pre_ids[0]
    logs = {job: folder / f"job_{job}" / f"{job}_0_log.out" for job in (full_id, pre_id)}
    wait_rows(base / "preempted" / "jepa_r0.csv", 3, pre_id, logs[pre_id])
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR2", pre_id], check=True, timeout=30)
    states = {job: wait_done(job, logs[job]) for job in (full_id, pre_id)}
    return dict(base=base, config=config, folder=folder, full=(full_id, full_proc), pre=(pre_id, pre_proc),
                states=states, logs=logs, signalled=signalled)


def test_job_trains_leaves_csvs_checkpoint_and_completes_in_sacct(two_runs):
    job, proc = two_runs["full"]
    assert two_runs["states"][job] == "COMPLETED", two_runs["logs"][job].read_text()[-3000:]
    run = two_runs["base"] / "full"
    steps = EPOCHS * STEPS_PER_EPOCH
    for rank in (0, 1):
        assert read_csv(run, rank)["step"].tolist() == list(range(1, steps + 1))
    state = weights(run)
    assert state["step"] == steps and state["world_size"] == 2
    assert f"sacct -j {job}" in proc.stdout and str(two_runs["logs"][job]) in proc.stdout
    record = two_runs["folder"] / f"job_{job}"
    assert "main_distributed.py" in (record / "command.txt").read_text()
    assert (record / "git.txt").read_text().startswith(("commit ", "not a git checkout"))
    assert (record / "git.diff").exists()
    assert f"folder: {run}" in (record / "config.yaml").read_text()
    log = two_runs["logs"][job].read_text()
    assert "run 1 (SLURM_RESTART_COUNT=0): 2 rank(s) on 1 node(s)" in log


def test_dry_run_prints_the_script_submitit_submitted(two_runs):
    job, _ = two_runs["full"]
    proc, ids = submit("--fname", two_runs["config"], "--folder", two_runs["folder"], "--dry-run")
    assert ids == []
    script = proc.stdout.split("\n", 1)[1].split("# resolved config", 1)[0]
    submitted = (two_runs["folder"] / f"job_{job}" / f"{job}_submission.sh").read_text()
    assert script.strip() == submitted.strip()


def _clock(line: str) -> float:
    hms = re.search(r"(\d\d):(\d\d):(\d\d)", line).group(0)
    day = datetime.date.today().isoformat()
    return datetime.datetime.fromisoformat(f"{day}T{hms}").timestamp()


def test_preempted_job_requeues_resumes_and_equals_uninterrupted(two_runs):
    job, _ = two_runs["pre"]
    log = two_runs["logs"][job].read_text()
    assert two_runs["states"][job] == "COMPLETED", log[-3000:]
    assert sacct_states(job, duplicates=True) == ["REQUEUED", "COMPLETED"]
    stop = int(re.search(r"preemption at step (\d+): requeued", log).group(1))
    assert 0 < stop < EPOCHS * STEPS_PER_EPOCH and stop % STEPS_PER_EPOCH != 0, f"not mid-epoch: step {stop}"
    assert "run 2 (SLURM_RESTART_COUNT=1)" in log
    resumed = re.search(r".*resumed from \S+jepa-latest.pth.tar at step (\d+).*", log)
    assert int(resumed.group(1)) == stop  # no step lost, none repeated

    full_run, run = two_runs["base"] / "full", two_runs["base"] / "preempted"
    for rank in (0, 1):
        full, pre = read_csv(full_run, rank), read_csv(run, rank)
        assert pre["step"].tolist() == full["step"].tolist()  # one header, no duplicate or missing step
        assert pre["loss"].tolist() == full["loss"].tolist()  # bitwise (full-precision decimal)
    a, b = weights(full_run), weights(run)
    for key in ("encoder", "predictor", "target_encoder"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after the requeue"

    after = log[resumed.end():]
    first_step = re.search(r"^\[rank 0\] \d\d:\d\d:\d\d INFO \[ep .*$", after, flags=re.M).group(0)
    round_trip = _clock(first_step) - two_runs["signalled"]
    print(f"preemption round trip (USR2 -> first step after resume): {round_trip:.0f} s; stopped and resumed "
          f"at step {stop}; steps lost: 0")
    assert round_trip < 240


def test_batch_launch_submits_two_configs_at_once(shards, tmp_path):
    # b trains another objective: the SLURM launcher serves every objective unchanged.
    for name, objective in (("a", "ijepa"), ("b", "gated")):
        write_config(tmp_path / f"{name}.yaml", tiny_config(shards, tmp_path / f"run_{name}",
                                                            optimization__epochs=1, meta__objective=objective))
    (tmp_path / "batch.yaml").write_text("- a.yaml\n- b.yaml\n")
    proc, ids = submit("--fname", tmp_path / "batch.yaml", "--batch-launch", "--folder", tmp_path / "submitit")
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0], proc.stdout  # one array job
    for job, name in zip(ids, ("a", "b")):
        log = tmp_path / "submitit" / f"job_{job}" / f"{job}_0_log.out"
        assert wait_done(job, log) == "COMPLETED", log.read_text()[-3000:]
        for rank in (0, 1):
            assert read_csv(tmp_path / f"run_{name}", rank)["step"].tolist() == list(range(1, 6))
    gated = read_csv(tmp_path / "run_b", 0)
    assert gated["open_frac"].between(0, 1).all() and gated["loss"].astype(float).notna().all()
    assert weights(tmp_path / "run_b")["config"]["meta"]["objective"] == "gated"


def test_sweep_is_one_array_whose_tasks_train_requeue_and_resume(shards, tmp_path):
    # The swept key changes only how often rank 0 prints, so both runs must train identically: task 1 is
    # preempted mid-epoch and must resume to the same losses as task 0, which runs uninterrupted.
    config = write_config(tmp_path / "tiny.yaml", tiny_config(shards, tmp_path / "sweep", data__batch_size=1,
                                                              optimization__epochs=1))
    started = time.time()
    proc, _ = submit("--fname", config, "--folder", tmp_path / "submitit", "--sweep", "logging.log_freq=1,5",
                     "--job-name", "ijepa-sweep-test", "--mail-type", "FAIL")
    array = re.search(r"^submitted sweep as array job (\d+) ", proc.stdout, flags=re.M).group(1)
    runs = {task: tmp_path / "sweep" / f"log_freq={freq}" for task, freq in ((0, 1), (1, 5))}
    for task, run in runs.items():
        assert re.search(rf"^{task}\s+{array}_{task}\s+logging.log_freq=\d\s+{re.escape(str(run))}$", proc.stdout,
                         flags=re.M), proc.stdout
    logs = {task: tmp_path / "submitit" / f"job_{array}_{task}" / f"{array}_{task}_0_log.out" for task in runs}
    script = tmp_path / "submitit" / f"job_{array}" / f"{array}_submission.sh"
    assert f"sbatch script: {script}" in proc.stdout and "#SBATCH --mail-type=FAIL" in script.read_text()
    wait_rows(runs[1] / "jepa_r0.csv", 3, f"{array}_1", logs[1])
    subprocess.run(["scancel", "--signal=USR2", f"{array}_1"], check=True, timeout=30)
    for task in runs:
        assert wait_done(f"{array}_{task}", logs[task]) == "COMPLETED", logs[task].read_text()[-3000:]
    print(f"sweep of 2 runs (one preempted): submitted and completed in {time.time() - started:.0f} s")
    assert sacct_states(f"{array}_0", duplicates=True) == ["COMPLETED"]
    assert sacct_states(f"{array}_1", duplicates=True) == ["REQUEUED", "COMPLETED"]

    log = logs[1].read_text()
    stop = int(re.search(r"preemption at step (\d+): requeued", log).group(1))
    assert f"job {array}_1 run 2 (SLURM_RESTART_COUNT=1)" in log
    assert int(re.search(r"resumed from \S+jepa-latest.pth.tar at step (\d+)", log).group(1)) == stop
    for rank in (0, 1):
        full, pre = read_csv(runs[0], rank), read_csv(runs[1], rank)
        assert full["step"].tolist() == pre["step"].tolist() == list(range(1, STEPS_PER_EPOCH + 1))
        assert pre["loss"].tolist() == full["loss"].tolist()
    for task, run in runs.items():
        assert yaml.safe_load((run / "params-ijepa.yaml").read_text())["logging"]["log_freq"] == (1, 5)[task]
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["folder"] for r in manifest["runs"]] == [str(runs[0]), str(runs[1])]
    assert manifest["submissions"][0]["jobs"] == [f"{array}_0", f"{array}_1"]


def test_local_cluster_config_lives_in_its_state_folder(cluster):
    # local_cluster.sh never uses /etc/slurm: clients find its config through SLURM_CONF (`env` prints it),
    # which tests/integration/conftest.py sets from the state folder when it is unset.
    conf = state_dir() / "etc" / "slurm.conf"
    if os.environ.get("SLURM_CONF") != str(conf):
        pytest.skip(f"SLURM_CONF={os.environ.get('SLURM_CONF')}: not the local cluster of local_cluster.sh")
    env = subprocess.run(["bash", str(ROOT / "launch/slurm/local_cluster.sh"), "env"], capture_output=True,
                         text=True, timeout=30)
    assert env.returncode == 0 and env.stdout == f"export SLURM_CONF={conf}\n", env.stdout + env.stderr
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    assert re.search(rf"^SLURM_CONF\s*=\s*{re.escape(str(conf))}$", shown, flags=re.M), shown[:2000]


def test_unknown_partition_is_refused_by_sinfo(cluster, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config("/d/x-{0..1}.tar", tmp_path / "run"))
    proc, ids = submit("--fname", config, "--folder", tmp_path / "s", "--partition", "nosuch", check=False)
    assert proc.returncode == 2 and ids == []
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --partition nosuch: sinfo does not know it")


def test_failed_job_stops_with_the_reason_instead_of_requeueing(cluster, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(str(tmp_path / "missing-{000000..000001}.tar"),
                                                           tmp_path / "run"))
    _, ids = submit("--fname", config, "--folder", tmp_path / "submitit")
    log = tmp_path / "submitit" / f"job_{ids[0]}" / f"{ids[0]}_0_log.out"
    assert wait_done(ids[0], log) == "FAILED"
    assert sacct_states(ids[0], duplicates=True) == ["FAILED"]  # never requeued
    text = log.read_text()
    assert "missing-000000.tar" in text and "not requeued" in text
