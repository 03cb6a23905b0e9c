"""Hang detection in one process: allowances, the line that names the stuck rank, the retry rule."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

from ijepa_scale.distributed.watchdog import (HANG_EXIT, Heartbeat, Watchdog, allowance_s, describe_hang,
                                              hang_count, is_peer_lost, peer_error_summary, read_hang_line,
                                              should_retry_after_hang)

GLOO_CLOSED = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                           "by peer [10.77.0.12]:41234. This is typically caused by a remote worker crashing. GLHF!")


def test_start_up_first_step_and_first_checkpoint_get_the_longer_allowance():
    assert allowance_s(60, 600, steps_done=0, phase="start-up", checkpoints_done=0) == 600
    assert allowance_s(60, 600, steps_done=0, phase="compute", checkpoints_done=0) == 600
    assert allowance_s(60, 600, steps_done=1, phase="compute", checkpoints_done=0) == 60
    assert allowance_s(60, 600, steps_done=5, phase="checkpoint", checkpoints_done=0) == 600
    assert allowance_s(60, 600, steps_done=5, phase="checkpoint", checkpoints_done=1) == 60
    assert allowance_s(60, 10, steps_done=0, phase="start-up", checkpoints_done=0) == 60


def test_heartbeat_counts_steps_and_checkpoints(tmp_path):
    hb = Heartbeat(tmp_path, rank=0, world_size=1)
    hb.beat("data wait", step=40)  # resumed at step 40: no step done in this process yet
    assert hb.steps_done == 0
    hb.beat("compute", step=41)
    assert hb.steps_done == 1 and hb.phase == "compute"
    hb.beat("checkpoint")
    hb.beat("data wait")
    assert hb.checkpoints_done == 1
    assert '"phase": "data wait"' in hb.path.read_text()


def test_the_line_names_the_rank_without_a_report():
    beats = {0: {"step": 42, "phase": "collective", "host": "a", "pid": 1},
             1: {"step": 42, "phase": "data wait", "host": "b", "pid": 2}}
    reports = {0: {"phase": "collective"}}
    line = describe_hang(reports, beats, world_size=2, waited_s=61)
    assert line == ("no step completed for 61 s: rank 1 (step 42, data wait, b pid 2) stopped making progress; "
                    "the other ranks waited (collective)")
    everyone = describe_hang({0: {"phase": "collective"}, 1: {"phase": "collective"}}, beats, 2, 61)
    assert "every rank is stuck (collective) at step 42" in everyone
    assert "rank 2 (never reported)" in describe_hang({}, beats, 3, 5)


def test_a_rank_without_progress_reports_names_the_silent_peer_kills_it_and_exits(tmp_path):
    # Rank 1 is a real process stopped with SIGSTOP; its heartbeat says where it was.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(child.pid, signal.SIGSTOP)
    stuck = Heartbeat(tmp_path, rank=1, world_size=2)
    stuck.beat("compute", step=3)
    record = json.loads(stuck.path.read_text())
    stuck.path.write_text(json.dumps({**record, "pid": child.pid}))
    live = Heartbeat(tmp_path, rank=0, world_size=2)
    live.beat("compute", step=3)
    live.beat("collective", step=3)
    live.steps_done = live.checkpoints_done = 1
    exited, log = [], open(tmp_path / "rank0.log", "w+")  # faulthandler writes to a real file
    done = threading.Event()

    def exit_fn(code):
        exited.append(code)
        done.set()

    hooked = []
    dog = Watchdog(live, timeout_s=0.3, startup_s=0.3, grace_s=0.3, log_stream=log, exit_fn=exit_fn,
                   on_hang=hooked.append).start()
    assert done.wait(10)
    dog.stop()
    assert exited == [HANG_EXIT]
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert len(hooked) == 1 and hooked[0] == read_hang_line(tmp_path)
    line = read_hang_line(tmp_path)
    assert line.startswith("no step completed for") and "rank 1 (step 3, compute" in line
    assert "the other ranks waited (collective)" in line
    text = (tmp_path / "rank0.log").read_text()
    assert "stacks of all threads" in text and "Thread" in text  # faulthandler's dump


def test_progress_keeps_the_watchdog_quiet(tmp_path):
    hb = Heartbeat(tmp_path, rank=0, world_size=1)
    exited = []
    # 1.5 s: a loaded machine (the whole unit suite beside other work) can stall this thread for 0.5 s.
    dog = Watchdog(hb, timeout_s=1.5, startup_s=1.5, grace_s=0.1, exit_fn=exited.append).start()
    for step in range(1, 41):
        hb.beat("compute", step=step)
        threading.Event().wait(0.05)
    hb.beat("done")
    threading.Event().wait(1.7)
    dog.stop()
    assert exited == []


def test_a_second_hang_at_the_same_checkpoint_is_not_retried(tmp_path):
    assert should_retry_after_hang(tmp_path, committed_step=40) is True
    assert should_retry_after_hang(tmp_path, committed_step=80) is True  # progress in between
    assert should_retry_after_hang(tmp_path, committed_step=80) is False  # none since the last hang
    assert should_retry_after_hang(tmp_path, committed_step=None) is True
    assert hang_count(tmp_path) == 4


def test_a_peer_lost_is_told_from_other_errors():
    assert is_peer_lost(GLOO_CLOSED)
    assert is_peer_lost(RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9117: Connection "
                                     "reset by peer"))
    nccl = type("DistBackendError", (RuntimeError,), {})("NCCL error: remote process exited or there was a network "
                                                         "error, NCCL version 2.21.5")
    assert is_peer_lost(nccl)
    assert is_peer_lost(type("DistNetworkError", (RuntimeError,), {})("failed to recv, got 0 bytes"))
    assert not is_peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied (3x4 and 5x6)"))
    assert not is_peer_lost(ValueError("Connection reset by peer"))  # a data source's, not a collective's
    assert not is_peer_lost(OSError(28, "No space left on device"))
    assert peer_error_summary(GLOO_CLOSED) == "Connection closed by peer [10.77.0.12]:41234"


def test_the_line_names_a_lost_rank():
    beats = {0: {"step": 9, "phase": "collective", "host": "a", "pid": 1},
             1: {"step": 9, "phase": "compute", "host": "b", "pid": 2}}
    line = describe_hang({0: {"phase": "collective"}}, beats, 2, 0.5, lost="Connection closed by peer", by=0)
    assert line == ("rank 1 (step 9, compute, b pid 2) was lost: rank 0 saw 'Connection closed by peer' in a "
                    "collective")
    everyone = describe_hang({0: {}, 1: {}}, beats, 2, 0.5, lost="Connection reset by peer", by=1)
    assert "yet every rank is still there" in everyone


def _two_ranks(tmp_path, dead_pid):
    lost = Heartbeat(tmp_path, rank=1, world_size=2)
    lost.beat("compute", step=9)
    lost.path.write_text(json.dumps({**json.loads(lost.path.read_text()), "pid": dead_pid}))
    live = Heartbeat(tmp_path, rank=0, world_size=2)
    live.beat("collective", step=9)
    return live


def test_a_lost_peer_on_this_host_ends_the_rank_at_once_named_as_lost(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = _two_ranks(tmp_path, gone.pid)
    exited, hooked = [], []
    dog = Watchdog(live, timeout_s=60, startup_s=60, grace_s=30, exit_fn=exited.append, on_hang=hooked.append,
                   log_stream=open(os.devnull, "w"))
    started = time.monotonic()
    assert dog.peer_lost(GLOO_CLOSED) is None
    assert time.monotonic() - started < 10  # no waiting the 30 s grace for a rank whose process is gone
    assert exited == [HANG_EXIT]
    assert hooked == [read_hang_line(tmp_path)]
    assert hooked[0].startswith("rank 1 (step 9, compute, ") and "was lost: rank 0 saw 'Connection closed" in hooked[0]
    assert json.loads((tmp_path / "heartbeat" / "giving-up").read_text())["rank"] == 0


def test_a_peer_that_failed_with_an_error_is_the_cause_not_a_lost_rank(tmp_path):
    live = _two_ranks(tmp_path, os.getpid())
    failed = Heartbeat(tmp_path, rank=1, world_size=2)
    failed.beat("compute", step=9)
    failed.fail("RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    exited, hooked = [], []
    dog = Watchdog(live, timeout_s=60, startup_s=60, grace_s=5, exit_fn=exited.append, on_hang=hooked.append)
    report = dog.peer_lost(GLOO_CLOSED)
    assert report["rank"] == 1 and "shapes cannot be multiplied" in report["error"]
    assert exited == [] and hooked == [] and read_hang_line(tmp_path) is None


def test_a_rank_that_still_makes_progress_follows_a_peer_that_gave_up(tmp_path):
    hb = Heartbeat(tmp_path, rank=1, world_size=2)
    hb.beat("compute", step=1)
    hb.beat("compute", step=2)
    (hb.dir / "giving-up").write_text(json.dumps({"rank": 0, "lost": "Connection reset by peer"}))
    done, exited = threading.Event(), []
    dog = Watchdog(hb, timeout_s=60, startup_s=60, grace_s=0.2, exit_fn=lambda code: (exited.append(code), done.set()),
                   log_stream=open(os.devnull, "w")).start()
    assert done.wait(10)
    dog.stop()
    assert exited == [HANG_EXIT]
    assert json.loads((hb.dir / "hang-rank1.json").read_text())["rank"] == 1  # its report: alive, not lost
