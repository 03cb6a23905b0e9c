"""Launcher pieces in one process: signal debouncing, failure reports, folder checks, run_rank's result."""

import os
import signal
import threading

import pytest
import torch

from ijepa_scale.config import ConfigError, config_from_dict, load_config
from ijepa_scale.errors import RunFailure, UserError
from ijepa_scale.launchers import local
from ijepa_scale.launchers.entry import check_logging_folder, remove_if_left_empty, run_rank
from ijepa_scale.training.trainer import NonFiniteLossError
from tests.helpers.photos import make_photo_shards


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.killed = False

    def is_alive(self):
        return not self.killed

    def kill(self):
        self.killed = True


@pytest.fixture
def ranks(monkeypatch):
    sent = []
    clock = [100.0]
    monkeypatch.setattr(local.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(local.time, "monotonic", lambda: clock[0])
    launcher = local._Ranks(rank_main=None, devices=["cpu", "cpu"], threads=None)
    launcher.processes = [FakeProcess(11), FakeProcess(12)]
    return launcher, sent, clock


def test_signals_at_once_are_one_request_and_forwarded_once(ranks):
    launcher, sent, clock = ranks
    launcher.on_signal(signal.SIGTERM, None)  # relayed by `timeout` ...
    clock[0] += 0.05
    launcher.on_signal(signal.SIGTERM, None)  # ... and delivered to the group
    clock[0] += 1.0
    launcher.on_signal(signal.SIGINT, None)  # still within the window: the same request
    assert sent == [(11, signal.SIGTERM), (12, signal.SIGTERM), (11, signal.SIGINT), (12, signal.SIGINT)]
    assert not any(p.killed for p in launcher.processes) and not launcher.aborted


def test_only_a_later_interrupt_aborts_and_sigusr2_never_does(ranks):
    launcher, sent, clock = ranks
    launcher.on_signal(signal.SIGUSR2, None)
    clock[0] += 30.0
    launcher.on_signal(signal.SIGUSR2, None)  # SLURM may repeat its warning: never an abort
    assert not any(p.killed for p in launcher.processes)
    launcher.on_signal(signal.SIGINT, None)
    assert all(p.killed for p in launcher.processes) and launcher.aborted


def test_failure_reports_print_one_line_or_the_first_traceback():
    user = local.describe(UserError("logging.folder=/x: cannot write"), rank=1)
    assert local.format_failure(user) == "error: logging.folder=/x: cannot write" and local.exit_code(user) == 2
    disk = local.describe(RunFailure("cannot write checkpoint /x/a.pth.tar: no space left"), rank=0)
    assert local.format_failure(disk) == "error: rank 0: cannot write checkpoint /x/a.pth.tar: no space left"
    assert local.exit_code(disk) == 1
    shared = local.describe(NonFiniteLossError("3 consecutive skipped steps"), rank=1)  # raised on every rank
    assert local.format_failure(shared) == "error: 3 consecutive skipped steps" and local.exit_code(shared) == 1
    try:
        raise KeyError("boom")
    except KeyError as exc:
        exc.failed_at = 5.0
        crash = local.describe(exc, rank=1)
    text = local.format_failure(crash)
    assert crash.at == 5.0 and "Traceback" in text and text.endswith("error: rank 1 failed first: KeyError: 'boom'")


def test_logging_folder_is_checked_before_start(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match=r"logging.folder=.*a_file/run: cannot create or write there"):
        check_logging_folder(str(tmp_path / "a_file" / "run"))
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_logging_folder(str(tmp_path / "a_file"))
    with pytest.raises(UserError, match="logging.folder is empty"):
        check_logging_folder("")
    check_logging_folder(str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir() and os.listdir(tmp_path / "new" / "run") == []


def test_a_refused_start_removes_only_the_folders_it_created(tmp_path):
    created = check_logging_folder(str(tmp_path / "new" / "run"))
    assert created == [tmp_path / "new", tmp_path / "new" / "run"]
    log = tmp_path / "new" / "run" / "jepa_r0.log"
    log.write_text("[rank 0] the start-up's lines\n")
    remove_if_left_empty(created, log)
    assert list(tmp_path.iterdir()) == []
    assert check_logging_folder(str(tmp_path)) == []  # it existed: never removed
    created = check_logging_folder(str(tmp_path / "run"))
    (tmp_path / "run" / "jepa-latest.pth.tar").write_text("")  # something else was written: kept
    remove_if_left_empty(created, tmp_path / "run" / "jepa_r0.log")
    assert (tmp_path / "run").is_dir()


def test_more_cpu_ranks_than_cores_warns(monkeypatch, capsys):
    monkeypatch.setattr(local.os, "sched_getaffinity", lambda pid: {0, 1})
    local._warn_oversubscribed(["cpu", "cpu"])
    assert capsys.readouterr().err == ""
    local._warn_oversubscribed(["cpu", "cpu", "cpu"])
    assert "3 CPU ranks on 2 core(s)" in capsys.readouterr().err


def test_empty_config_is_an_error_naming_what_is_missing(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("\n")
    with pytest.raises(ConfigError, match=r"empty.yaml is empty: .*data.shards.*meta.model_name"):
        load_config(path, ["data.shards=/x/a.tar"])


def tiny_cfg(shards, folder, **optimization):
    return config_from_dict({
        "data": {"batch_size": 4, "crop_size": 32, "num_workers": 1, "shards": shards, "pin_mem": False},
        "logging": {"folder": str(folder)},
        "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3],
                 "aspect_ratio": [0.75, 1.5], "num_pred_masks": 2, "min_keep": 2},
        "meta": {"model_name": "vit_tiny", "embed_dim": 48, "depth": 1, "num_heads": 3, "pred_depth": 1,
                 "pred_emb_dim": 24},
        "optimization": {"epochs": 2, "warmup": 1, "ema": [0.9, 1.0], **optimization},
    })


def test_run_rank_reports_the_agreed_signal_and_restores_the_callers_handler(tmp_path):
    make_photo_shards(tmp_path / "shards", sizes=[12, 12], num_classes=2, size=(40, 40))
    cfg = tiny_cfg(str(tmp_path / "shards" / "train-{000000..000001}.tar"), tmp_path / "run")
    calls = []

    def submitit_like(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    stopped = []
    try:
        # Arrives "during start-up": held pending until run_rank has its own handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
        # Directed at this (main) thread: a process-directed kill could land on any helper thread another
        # test left running (an HTTP server, a TensorBoard writer) that does not block the signal.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)
        result = run_rank(cfg, 0, 1, "cpu", on_stop=stopped.append)
        assert signal.getsignal(signal.SIGUSR2) is submitit_like
    finally:
        signal.signal(signal.SIGUSR2, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2])
    assert calls == []  # run_rank's handler took it; the caller chains after the save
    assert not result.completed and result.stop_reason == "signal" and result.signals == ("SIGUSR2",)
    assert result.step == 1 and result.checkpoint == tmp_path / "run" / "jepa-latest.pth.tar"
    assert torch.load(result.checkpoint, weights_only=False)["step"] == 1
    assert result.previous_handlers[signal.SIGUSR2] is submitit_like and stopped == [result]
