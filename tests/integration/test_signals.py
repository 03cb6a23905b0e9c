"""Stop signals on every delivery path (2 gloo ranks): the ranks agree on a step, save it, exit 0."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.integration.common import ROOT, read_csv, run_main, tiny_config, write_config

pytestmark = pytest.mark.integration
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")


def long_config(shards, tmp_path, **overrides):
    # Far more steps than a test waits for; latest is still written at every epoch end.
    config = tiny_config(shards, tmp_path / "run", optimization__epochs=400, logging__checkpoint_freq=1000,
                         logging__log_freq=1000, **overrides)
    return write_config(tmp_path / "c.yaml", config)


def start(command, tmp_path):
    out, err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=ENV, cwd=ROOT, start_new_session=True)
    proc.outputs = (out, err)
    return proc


def main_cmd(config, *extra):
    return [sys.executable, str(ROOT / "main.py"), "--fname", str(config), "--devices", "cpu", "cpu", *extra]


def wait_for_steps(proc, run, steps=2, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, read_output(proc)
        if (run / "jepa_r1.csv").exists() and (run / "jepa_r0.csv").exists():
            if min(len(read_csv(run, r)) for r in (0, 1)) >= steps:
                return
        time.sleep(0.2)
    raise AssertionError("no training steps within the timeout")


def rank_pids(launcher_pid):
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in children
            if "multiprocessing.spawn" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")]


def read_output(proc):
    texts = []
    for f in proc.outputs:
        f.flush()
        f.seek(0)
        texts.append(f.read())
    return tuple(texts)


def finish(proc, timeout=120):
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return read_output(proc)


def assert_saved_at_last_step(run, stdout, stderr):
    """Both ranks logged the same steps and the checkpoint holds exactly the last one."""
    steps = [read_csv(run, r)["step"].tolist() for r in (0, 1)]
    assert steps[0] == steps[1] and steps[0] == list(range(1, len(steps[0]) + 1))
    state = torch.load(run / "jepa-latest.pth.tar", weights_only=False, map_location="cpu")
    assert state["step"] == steps[0][-1]
    assert "Traceback" not in stderr and "error" not in stderr.lower(), stderr[-3000:]
    assert "stopped on request" in stdout and f"at step {state['step']}, checkpoint saved" in stdout
    return state["step"]


def test_sigterm_to_the_whole_group_saves_and_resumes_exactly(shards, tmp_path):
    config = long_config(shards, tmp_path)
    run = tmp_path / "run"
    proc = start(main_cmd(config), tmp_path)
    wait_for_steps(proc, run)
    os.killpg(proc.pid, signal.SIGTERM)  # launcher, ranks and data workers, as systemd / SLURM / kill -TERM -PGID
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = assert_saved_at_last_step(run, stdout, stderr)
    assert "(SIGTERM)" in stdout

    # Resuming continues bit-exactly: the losses equal those of an uninterrupted run.
    target = stopped + 2
    resumed = run_main(config, f"optimization.stop_at_step={target}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = run_main(config, f"optimization.stop_at_step={target}", f"logging.folder={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    for rank in (0, 1):
        assert read_csv(run, rank)["loss"].tolist() == read_csv(tmp_path / "ref", rank)["loss"].tolist()
        assert read_csv(run, rank)["step"].tolist() == list(range(1, target + 1))


@pytest.mark.parametrize("target,signum", [
    ("launcher", signal.SIGINT),  # Ctrl-C relayed to the launcher's pid alone
    ("rank1", signal.SIGTERM),  # one rank alone: the others learn it in the step's all-reduce
    ("group", signal.SIGUSR2),  # SLURM's warning signal, to every process (the launcher must not die)
])
def test_a_signal_to_any_process_saves_at_an_agreed_step(shards, tmp_path, target, signum):
    config = long_config(shards, tmp_path)
    run = tmp_path / "run"
    proc = start(main_cmd(config), tmp_path)
    wait_for_steps(proc, run)
    if target == "launcher":
        os.kill(proc.pid, signum)
    elif target == "group":
        os.killpg(proc.pid, signum)
    else:
        ranks = rank_pids(proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[1], signum)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert_saved_at_last_step(run, stdout, stderr)
    assert f"({signum.name})" in stdout


@pytest.mark.parametrize("gap_s", [0.5, 0.75, 1.0])
def test_two_quick_interrupts_are_one_request(shards, tmp_path, gap_s):
    # Ctrl-C twice in a terminal: both reach the whole group within ABORT_AFTER_S, and the second may
    # arrive while the ranks are saving or already exiting; it must not kill one of them.
    config = long_config(shards, tmp_path)
    run = tmp_path / "run"
    proc = start(main_cmd(config), tmp_path)
    wait_for_steps(proc, run)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(gap_s)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert_saved_at_last_step(run, stdout, stderr)


def test_timeout_wrapper_expiry_counts_as_one_request(shards, tmp_path):
    # On expiry `timeout` sends SIGTERM to the launcher and then to the whole group: the
    # launcher sees it twice at once, which must not count as a second (aborting) interrupt.
    config = long_config(shards, tmp_path)
    run = tmp_path / "run"
    proc = start(["timeout", "-s", "TERM", "600", *main_cmd(config)], tmp_path)
    wait_for_steps(proc, run)
    os.kill(proc.pid, signal.SIGALRM)  # what timeout's own timer does when the duration is over
    stdout, stderr = finish(proc)
    assert proc.returncode == 124, stderr[-3000:]  # timeout's status after the time limit; main.py exited 0
    assert_saved_at_last_step(run, stdout, stderr)
    assert "killing the ranks" not in stderr


def test_signal_during_start_up_ends_cleanly(shards, tmp_path):
    config = long_config(shards, tmp_path)
    run = tmp_path / "run"
    proc = start(main_cmd(config), tmp_path)
    deadline = time.time() + 120
    while len(rank_pids(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # the ranks are still importing torch
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert_saved_at_last_step(run, stdout, stderr)


def test_sigterm_to_torchrun_group_saves(shards, tmp_path):
    config = long_config(shards, tmp_path)
    run = tmp_path / "run"
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  str(ROOT / "main.py"), "--fname", str(config), "--devices", "cpu"], tmp_path)
    wait_for_steps(proc, run)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = finish(proc)
    steps = [read_csv(run, r)["step"].tolist() for r in (0, 1)]
    assert steps[0] == steps[1]
    state = torch.load(run / "jepa-latest.pth.tar", weights_only=False, map_location="cpu")
    assert state["step"] == steps[0][-1], stderr[-3000:]
    assert f"at step {state['step']}, checkpoint saved" in stdout
