"""main_distributed.py across 2 SLURM nodes: `bash launch/slurm/local_cluster.sh start --nodes 2`.

Each node of the local cluster is its own host (network + UTS namespace, host name ijepa-nK, address
10.77.0.(10+K)); the ranks of a 2-node job meet over the bridge, as on a real cluster. The tests
need a partition with at least 2 usable nodes and skip otherwise; IJEPA_REQUIRE_SLURM_NODES=2 (set by
.ci/run) turns that skip into a failure. docs/multinode.md has the commands.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.common import ROOT, SHARD_SIZES, make_shards, read_csv, tiny_config, write_config
from tests.integration.test_slurm import (PARTITION, _clock, _cluster_problem, sacct_states, submit, wait_done,
                                          wait_rows, weights)

pytestmark = pytest.mark.integration

# Batch 1 on 2 ranks: 21 steps per epoch, so a signal a few steps in lands mid-epoch. No data workers:
# each would be one more process importing torch, and the machine may have 2 cores for all of them.
EPOCHS = 2
STEPS_PER_EPOCH = sum(SHARD_SIZES) // 2
STEPS = EPOCHS * STEPS_PER_EPOCH
HANG_S = 6


def _nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"], capture_output=True, text=True,
                         timeout=20)
    return [line.split()[0] for line in out.stdout.splitlines() if re.search(r" (idle|mixed|alloc)", line)]


@pytest.fixture(scope="module")
def nodes():
    problem = _cluster_problem()
    if problem is None and len(_nodes()) < 2:
        problem = f"partition {PARTITION!r} has fewer than 2 usable nodes ({_nodes()})"
    if problem is not None:
        if int(os.environ.get("IJEPA_REQUIRE_SLURM_NODES", "0")) >= 2:
            pytest.fail(f"IJEPA_REQUIRE_SLURM_NODES={os.environ['IJEPA_REQUIRE_SLURM_NODES']} but {problem}: "
                        "start the cluster with `bash launch/slurm/local_cluster.sh start --nodes 2`")
        pytest.skip(f"{problem}: start a 2-node cluster with `bash launch/slurm/local_cluster.sh start --nodes 2`")
    return _nodes()


def main_locally(config: Path, ranks: int) -> subprocess.Popen:
    """The same config with main.py on this machine, `ranks` gloo ranks: the reference."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")  # this checkout's code
    cmd = [sys.executable, str(ROOT / "main.py"), "--fname", str(config), "--devices", *["cpu"] * ranks]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(nodes, tmp_path_factory):
    """At once: 2 nodes x 1 task left alone, the same preempted with USR2 a few steps in, 2 nodes x 2 tasks;
    the references (main.py with 2 and 4 local ranks, same configs) run while the preempted job waits for
    its requeue. Whatever still runs on the way out is cancelled or killed."""
    base = tmp_path_factory.mktemp("multinode")
    shards = make_shards(base / "shards")
    two = dict(data__batch_size=1, data__num_workers=0, optimization__epochs=EPOCHS)
    four = dict(data__batch_size=1, data__num_workers=0, optimization__epochs=1)
    config = write_config(base / "two.yaml", tiny_config(shards, base / "full", **two))
    config4 = write_config(base / "four.yaml", tiny_config(shards, base / "four", **four))
    folder = base / "submitit"
    jobs: list[str] = []
    procs: dict[str, subprocess.Popen] = {}
    try:
        full_proc, ids = submit("--fname", config, "--folder", folder, "--nodes", "2", "--tasks-per-node", "1")
        jobs += ids
        pre_proc, ids = submit("--fname", config, "--folder", folder, "--nodes", "2", "--tasks-per-node", "1",
                               f"logging.folder={base / 'preempted'}")
        jobs += ids
        four_proc, ids = submit("--fname", config4, "--folder", folder, "--nodes", "2", "--tasks-per-node", "2")
        jobs += ids
        full_id, pre_id, four_id = jobs
        logs = {job: folder / f"job_{job}" / f"{job}_0_log.out" for job in jobs}
        wait_rows(base / "preempted" / "jepa_r0.csv", 3, pre_id, logs[pre_id])
        signalled = time.time()
        subprocess.run(["scancel", "--signal=USR2", pre_id], check=True, timeout=30)
        # The references start now, while the preempted job waits to be requeued.
        started = time.time()
        local = {}
        for name, cfg, ranks in (("local2", tiny_config(shards, base / "local2", **two), 2),
                                 ("local4", tiny_config(shards, base / "local4", **four), 4)):
            procs[name] = main_locally(write_config(base / f"{name}.yaml", cfg), ranks)
            local[name] = base / name
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, out[-3000:]
        print(f"\nmain.py references: {time.time() - started:.0f} s")
        states = {job: wait_done(job, logs[job], timeout=240) for job in (full_id, pre_id, four_id)}
        print(f"SLURM jobs done {time.time() - signalled:.0f} s after the USR2")
        # Then two jobs at once: rank 1 (on the second node) stopped a few steps in, and killed.
        hung_config = write_config(base / "hung.yaml", tiny_config(
            shards, base / "hung", **two, distributed__hang_timeout_s=HANG_S, distributed__startup_timeout_s=120,
            checkpoint__every_steps=2))
        hit, hit_at, rank1 = {}, {}, {}
        for name in ("hung", "lost"):
            _, ids = submit("--fname", hung_config, "--folder", folder, "--nodes", "2", "--tasks-per-node", "1",
                            f"logging.folder={base / name}")
            jobs += ids
            hit[name] = ids[0]
            logs[ids[0]] = folder / f"job_{ids[0]}" / f"{ids[0]}_0_log.out"
        for name, signum in (("hung", signal.SIGSTOP), ("lost", signal.SIGKILL)):
            wait_rows(base / name / "jepa_r0.csv", 3, hit[name], logs[hit[name]], timeout=240)
            rank1[name] = json.loads((base / name / "heartbeat" / "rank1.json").read_text())
            os.kill(rank1[name]["pid"], signum)  # the node namespaces share this machine's process ids
            hit_at[name] = time.time()
        requeued_at = None
        while requeued_at is None and time.time() - hit_at["lost"] < 120:
            if "REQUEUED" in sacct_states(hit["lost"], duplicates=True):
                requeued_at = time.time()
            time.sleep(0.2)
        for name in ("hung", "lost"):
            states[hit[name]] = wait_done(hit[name], logs[hit[name]], timeout=300)
            hit[f"{name}_done_s"] = time.time() - hit_at[name]
        hit["lost_requeued_s"] = None if requeued_at is None else requeued_at - hit_at["lost"]
        print(f"hung job: SIGSTOP to COMPLETED after its requeue {hit['hung_done_s']:.0f} s; lost job: SIGKILL to "
              f"REQUEUED {hit['lost_requeued_s'] or float('nan'):.1f} s, to COMPLETED {hit['lost_done_s']:.0f} s")
        yield dict(base=base, folder=folder, full=(full_id, full_proc), pre=pre_id, four=(four_id, four_proc),
                   hung=hit["hung"], lost=hit["lost"], hit=hit, rank1=rank1, states=states, logs=logs,
                   signalled=signalled, local=local)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        left = [job for job in jobs if sacct_states(job) and not sacct_states(job)[-1].startswith(
            ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))]
        if left:
            subprocess.run(["scancel", *left], timeout=30)


def test_a_stopped_rank_on_the_second_node_requeues_the_job_which_resumes_exactly(runs):
    job = runs["hung"]
    assert runs["states"][job].startswith("COMPLETED")
    assert "REQUEUED" in sacct_states(job, duplicates=True)
    log = runs["logs"][job].read_text()
    assert re.search(r"hang: no step completed for \d+ s: rank 1 \(step \d+, [a-z ]+, ijepa-n2 pid \d+\) stopped "
                     r"making progress", log), log[-3000:]
    assert "requeued to resume from the checkpoint of step" in log
    assert_same_losses(runs["base"] / "hung", runs["local"]["local2"], 2)


def test_a_killed_task_on_the_second_node_requeues_the_job_which_resumes_exactly(runs):
    job, killed = runs["lost"], runs["rank1"]["lost"]
    log = runs["logs"][job].read_text()
    assert runs["states"][job] == "COMPLETED", log[-3000:]
    assert sacct_states(job, duplicates=True) == ["REQUEUED", "COMPLETED"]
    assert killed["host"] == "ijepa-n2"
    lost = re.search(rf"lost rank: rank 1 \(step (\d+), [a-z ]+, ijepa-n2 pid {killed['pid']}\) was lost: rank 0 "
                     r"saw '[^']*Connection (closed|reset) by peer[^']*' in a collective; requeued to resume from the "
                     r"checkpoint of step (\d+) \(hang or lost rank 1 of at most \d+\)", log)
    assert lost is not None, log[-3000:]
    resumed = int(re.search(r"resumed from \S+jepa-latest.pth.tar at step (\d+)", log).group(1))
    assert resumed == int(lost.group(3)) and int(lost.group(1)) - resumed <= 2  # checkpoint.every_steps=2
    assert runs["hit"]["lost_requeued_s"] < 30, runs["hit"]  # at once, not after the hang timeout
    assert_same_losses(runs["base"] / "lost", runs["base"] / "full", 2, STEPS)
    a, b = weights(runs["base"] / "full"), weights(runs["base"] / "lost")
    for key in ("encoder", "predictor", "target_encoder"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after the requeue"
    print(f"2-node lost task: SIGKILL at step {lost.group(1)}, resumed at step {resumed} (steps lost: "
          f"{int(lost.group(1)) - resumed}); SIGKILL to REQUEUED {runs['hit']['lost_requeued_s']:.1f} s, "
          f"to COMPLETED {runs['hit']['lost_done_s']:.0f} s")


def task_hosts(folder: Path, job: str, tasks: int) -> list[str]:
    """The host name each task of `job` ran on, from submitit's start line of its log."""
    hosts = []
    for task in range(tasks):
        text = (folder / f"job_{job}" / f"{job}_{task}_log.out").read_text()
        hosts.append(re.search(r"JobEnvironment\(job_id=\S+, hostname=([^,]+),", text).group(1))
    return hosts


def sacct_nodes(job: str) -> tuple[int, str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "NNodes,NodeList"], capture_output=True,
                         text=True, timeout=30).stdout.split()[-1]
    count, nodelist = out.split("|")
    return int(count), nodelist


def assert_same_losses(run: Path, reference: Path, ranks: int, steps: int | None = None) -> None:
    for rank in range(ranks):
        got, want = read_csv(run, rank), read_csv(reference, rank)
        assert got["step"].tolist() == list(range(1, (steps or len(want)) + 1)), f"rank {rank}"
        assert got["loss"].tolist() == want["loss"].tolist(), f"rank {rank}: losses differ from main.py's"
    assert not (run / f"jepa_r{ranks}.csv").exists()


def test_nodes_are_separate_hosts_with_their_own_address(nodes):
    # Every task runs in its node's namespaces: its own host name, which resolves to an address
    # that only that namespace has (bind to it succeeds there).
    probe = ("import socket; h = socket.gethostname(); a = socket.gethostbyname(h); "
             "s = socket.socket(); s.bind((a, 0)); print(h, a)")
    out = subprocess.run(["srun", "-p", PARTITION, "-N2", "--ntasks-per-node=1", "-t", "1", sys.executable, "-c",
                          probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = dict(line.split() for line in out.stdout.splitlines())
    assert len(seen) == 2 and len(set(seen.values())) == 2 and set(seen) <= set(nodes), seen
    assert not any(addr.startswith("127.") for addr in seen.values()), seen


def test_two_nodes_one_task_each_completes_and_equals_main_py(runs):
    job, proc = runs["full"]
    assert runs["states"][job] == "COMPLETED", runs["logs"][job].read_text()[-3000:]
    count, nodelist = sacct_nodes(job)
    assert count == 2, nodelist
    hosts = task_hosts(runs["folder"], job, 2)
    assert len(set(hosts)) == 2, hosts  # rank 0 and rank 1 on different hosts
    assert "2 node(s) x 1 task(s)" in proc.stdout
    log = runs["logs"][job].read_text()
    assert f"run 1 (SLURM_RESTART_COUNT=0): 2 rank(s) on 2 node(s), master {hosts[0]}:" in log
    run = runs["base"] / "full"
    assert_same_losses(run, runs["local"]["local2"], 2, STEPS)
    state = weights(run)
    assert state["world_size"] == 2 and state["step"] == STEPS


def test_two_nodes_two_tasks_each_equals_main_py_with_four_ranks(runs):
    job, proc = runs["four"]
    assert runs["states"][job] == "COMPLETED", runs["logs"][job].read_text()[-3000:]
    assert sacct_nodes(job)[0] == 2
    hosts = task_hosts(runs["folder"], job, 4)
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3], hosts  # ranks 0,1 on one node, 2,3 on the other
    assert "4 rank(s) on 2 node(s)" in runs["logs"][job].read_text()
    assert_same_losses(runs["base"] / "four", runs["local"]["local4"], 4)
    state = weights(runs["base"] / "four")
    assert state["world_size"] == 4 and state["step"] == len(read_csv(runs["local"]["local4"], 0)) > 0


def test_two_node_job_preempted_requeues_and_resumes_exactly(runs):
    job = runs["pre"]
    log = runs["logs"][job].read_text()
    assert runs["states"][job] == "COMPLETED", log[-3000:]
    assert sacct_states(job, duplicates=True) == ["REQUEUED", "COMPLETED"]
    assert sacct_nodes(job)[0] == 2
    stop = int(re.search(r"preemption at step (\d+): requeued", log).group(1))
    assert 0 < stop < STEPS and stop % STEPS_PER_EPOCH != 0, f"not mid-epoch: step {stop}"
    assert "run 2 (SLURM_RESTART_COUNT=1): 2 rank(s) on 2 node(s)" in log
    resumed = re.search(r".*resumed from \S+jepa-latest.pth.tar at step (\d+).*", log)
    assert int(resumed.group(1)) == stop  # no step lost, none repeated

    run, full = runs["base"] / "preempted", runs["base"] / "full"
    assert_same_losses(run, full, 2, STEPS)  # one header, no step missing or repeated
    a, b = weights(full), weights(run)
    for key in ("encoder", "predictor", "target_encoder"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after the requeue"

    first_step = re.search(r"^\[rank 0\] \d\d:\d\d:\d\d INFO \[ep .*$", log[resumed.end():], flags=re.M).group(0)
    round_trip = _clock(first_step) - runs["signalled"]
    print(f"2-node preemption round trip (USR2 -> first step after resume): {round_trip:.0f} s; stopped and "
          f"resumed at step {stop}; steps lost: 0")
    assert round_trip < 240
