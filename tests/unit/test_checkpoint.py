import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ijepa_scale.checkpoint.files import CheckpointFiles, atomic_save, load_checkpoint_file


def test_save_writes_periodic_and_latest_with_same_content(tmp_path):
    files = CheckpointFiles(tmp_path, "jepa")
    files.save({"step": 3, "w": torch.arange(4)}, files.epoch_path(1))
    assert torch.load(files.latest)["step"] == 3
    assert torch.load(files.epoch_path(1))["step"] == 3
    files.save({"step": 4}, None)
    assert torch.load(files.latest)["step"] == 4
    # Overwriting latest must not touch the periodic file it was linked to.
    assert torch.load(files.epoch_path(1))["step"] == 3


def test_retention_keeps_newest_and_latest(tmp_path):
    files = CheckpointFiles(tmp_path, "jepa", keep_last=3)
    for step in range(1, 11):
        files.save({"step": step}, files.step_path(step))
        time.sleep(0.002)
    names = sorted(p.name for p in files.periodic_files())
    assert names == ["jepa-step10.pth.tar", "jepa-step8.pth.tar", "jepa-step9.pth.tar"]
    assert torch.load(files.latest)["step"] == 10


def test_retention_zero_keeps_all(tmp_path):
    files = CheckpointFiles(tmp_path, "jepa", keep_last=0)
    for epoch in range(1, 5):
        files.save({"epoch": epoch}, files.epoch_path(epoch))
    assert len(files.periodic_files()) == 4


def test_resolve_resume(tmp_path):
    files = CheckpointFiles(tmp_path, "jepa")
    assert files.resolve_resume(None, required=False) is None
    with pytest.raises(FileNotFoundError, match="meta.load_checkpoint=true but there is no jepa-latest"):
        files.resolve_resume(None, required=True)
    with pytest.raises(FileNotFoundError, match="meta.read_checkpoint='jepa-ep3.pth.tar'"):
        files.resolve_resume("jepa-ep3.pth.tar", required=True)
    files.save({"epoch": 3}, files.epoch_path(3))
    assert files.resolve_resume(None, required=False) == files.latest
    # As official, read_checkpoint only counts with load_checkpoint; latest is linked to ep3 here.
    assert files.resolve_resume("jepa-ep3.pth.tar", required=False) == files.latest
    assert files.resolve_resume("jepa-ep3.pth.tar", required=True) in (files.epoch_path(3), files.latest)


def test_latest_wins_over_read_checkpoint_only_when_it_descends_from_it(tmp_path):
    files = CheckpointFiles(tmp_path, "jepa")
    files.save({"epoch": 3, "step": 30}, files.epoch_path(3))
    files.save({"epoch": 5, "step": 50, "lineage": []}, None)
    # Rolling back: latest does not come from ep3, so the requested file is used.
    assert files.resolve_resume("jepa-ep3.pth.tar", required=True) == files.epoch_path(3)
    # After resuming from ep3, latest records it: a restart continues from latest instead of looping.
    files.save({"step": 41, "lineage": [{"file": "jepa-ep3.pth.tar", "step": 30}]}, None)
    assert files.resolve_resume("jepa-ep3.pth.tar", required=True) == files.latest
    # ep3 overwritten by another run (other step): its name alone does not count as lineage.
    files.save({"epoch": 3, "step": 33}, files.epoch_path(3))
    files.save({"step": 41, "lineage": [{"file": "jepa-ep3.pth.tar", "step": 30}]}, None)
    assert files.resolve_resume("jepa-ep3.pth.tar", required=True) == files.epoch_path(3)


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "jepa-latest.pth.tar"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint.*Refusing to start from scratch"):
        load_checkpoint_file(path)


def test_exception_mid_write_leaves_previous_file(tmp_path):
    path = tmp_path / "jepa-latest.pth.tar"
    atomic_save({"step": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"step": 2, "bad": Boom()}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["jepa-latest.pth.tar"]


WRITER = textwrap.dedent(
    """
    import sys, torch
    from ijepa_scale.checkpoint.files import CheckpointFiles
    files = CheckpointFiles(sys.argv[1], "jepa")
    step = int(sys.argv[2])
    big = torch.full((4_000_000,), float(step))
    while True:
        step += 1
        files.save({"step": step, "payload": big.fill_(float(step))}, None)
        print(step, flush=True)
    """
)


def test_sigkill_during_saves_never_leaves_a_truncated_latest(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    folder = tmp_path / "run"
    folder.mkdir()
    last_seen = 0
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(folder), str(last_seen)],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete save happened
        time.sleep(0.01 + 0.03 * trial)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = torch.load(folder / "jepa-latest.pth.tar")
        assert state["payload"].numel() == 4_000_000
        assert torch.all(state["payload"] == float(state["step"]))
        assert state["step"] > last_seen
        last_seen = state["step"]
    # Stray temporaries of killed writers are removed by the next successful save.
    CheckpointFiles(folder, "jepa").save({"step": -1}, None)
    assert sorted(p.name for p in folder.iterdir()) == ["jepa-latest.pth.tar"]


def test_sharded_checkpoint_folders_count_only_once_committed(tmp_path):
    import os

    from ijepa_scale.checkpoint.dcp import COMMIT_MARKER
    from ijepa_scale.checkpoint.files import CheckpointFiles

    files = CheckpointFiles(tmp_path, "jepa", keep_last=1)
    first = files.dcp_path(tmp_path / "jepa-step2.pth.tar", 2)
    assert first.name == "jepa-step2.dcp"
    files.begin_dcp(first)
    (first / ".metadata").write_bytes(b"m")
    assert files.current_latest() is None  # written but not committed
    files.commit_dcp(first, periodic=True)
    assert files.current_latest() == first.resolve() and (first / COMMIT_MARKER).is_file()
    second = files.dcp_path(tmp_path / "jepa-step4.pth.tar", 4)
    files.begin_dcp(second)
    (second / ".metadata").write_bytes(b"m")
    # A crash here: latest still names the committed folder, and resume picks it.
    assert files.resolve_resume(None, required=False) == first.resolve()
    assert os.readlink(files.latest_dcp) == "jepa-step2.dcp"
    files.commit_dcp(second, periodic=True)
    assert files.current_latest() == second.resolve()
    assert not first.exists()  # keep_last=1
    stopped = files.dcp_path(None, 5)
    files.begin_dcp(stopped)
    (stopped / ".metadata").write_bytes(b"m")
    files.commit_dcp(stopped, periodic=False)
    assert files.current_latest() == stopped.resolve() and second.exists()


def _committed_dcp(files, step, periodic=None):
    from ijepa_scale.checkpoint.dcp import TRAINER_STATE

    folder = files.dcp_path(periodic, step)
    files.begin_dcp(folder)
    (folder / ".metadata").write_bytes(b"m")
    atomic_save({"step": step}, folder / TRAINER_STATE)
    files.commit_dcp(folder, periodic=periodic is not None)
    return folder


def test_latest_is_the_higher_recorded_step_not_the_newer_file(tmp_path):
    import os
    import time

    files = CheckpointFiles(tmp_path, "jepa")
    folder = _committed_dcp(files, 9)
    # Both latests, as a run that switched distributed.parallel leaves them after a copy that did not keep
    # timestamps: the older step's file now looks newer.
    atomic_save({"step": 5}, files.latest)
    later = time.time() + 100
    os.utime(files.latest, (later, later))
    assert files.current_latest() == folder.resolve()
    assert files.resolve_resume(None, required=False) == folder.resolve()
    assert files.resolve_resume("jepa-latest.pth.tar", required=True) == folder.resolve()
    atomic_save({"step": 12}, files.latest)
    os.utime(files.latest, (1, 1))
    assert files.current_latest() == files.latest


def test_a_new_latest_removes_the_superseded_one_of_the_other_kind(tmp_path):
    files = CheckpointFiles(tmp_path, "jepa")
    periodic = _committed_dcp(files, 3, periodic=tmp_path / "jepa-ep1.pth.tar")
    folder = _committed_dcp(files, 4)
    files.save({"step": 6}, None)
    assert not files.latest_dcp.is_symlink() and files.current_latest() == files.latest
    assert not folder.exists() and periodic.is_dir()  # a latest-only folder goes, a periodic one stays
    newer = _committed_dcp(files, 8)
    assert not files.latest.exists() and files.current_latest() == newer.resolve()
