"""Resume and save errors of the trainer in one process: one-line causes, no surprises."""

import errno
import logging

import pytest
import torch

from ijepa_scale.distributed.env import DistEnv
from ijepa_scale.errors import UserError
from ijepa_scale.checkpoint.manager import CheckpointWriteError
from ijepa_scale.training.trainer import Trainer
from tests.unit.test_launchers import tiny_cfg

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def trainer_for(shards, folder, depth=1, **optimization):
    cfg = tiny_cfg(shards, folder, **optimization)
    cfg.meta.depth = depth
    return Trainer(cfg, CPU)


def stopped_run(shards, folder, stop_at=2, **kwargs):
    trainer = trainer_for(shards, folder, stop_at_step=stop_at, **kwargs)
    assert trainer.train() is False
    trainer.close()


def test_disk_full_during_a_save_names_the_file_and_free_space(shards, tmp_path, monkeypatch):
    trainer = trainer_for(shards, tmp_path / "run")

    def full(state, periodic):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.checkpoints.files, "save", full)
    with pytest.raises(CheckpointWriteError) as info:
        trainer.save()
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot write checkpoint {tmp_path / 'run' / 'jepa-latest.pth.tar'}: no space left on device" in message
    assert "MB free in" in message and "no checkpoint of this run exists yet" in message
    trainer.close()


def test_resume_into_another_architecture_names_the_key(shards, tmp_path):
    stopped_run(shards, tmp_path / "run")
    params = (tmp_path / "run" / "params-ijepa.yaml").read_text()
    with pytest.raises(UserError) as info:
        trainer_for(shards, tmp_path / "run", depth=3)
    assert "encoder depth 1, the config asks for 3 (meta.depth)" in str(info.value)
    assert "meta.model_name=vit_tiny" in str(info.value)
    # The refused run left the old config in place.
    assert (tmp_path / "run" / "params-ijepa.yaml").read_text() == params


def test_a_checkpoint_that_holds_a_bare_tensor_is_refused_with_the_hint(shards, tmp_path):
    (tmp_path / "run").mkdir()
    torch.save(torch.zeros(3), tmp_path / "run" / "jepa-latest.pth.tar")
    with pytest.raises(UserError) as info:
        trainer_for(shards, tmp_path / "run")
    message = str(info.value)
    assert "holds a Tensor, not a training checkpoint" in message and "meta.load_checkpoint=true" in message


def test_more_epochs_on_resume_warns_with_schedule_values(shards, tmp_path, caplog):
    stopped_run(shards, tmp_path / "run", stop_at=12)  # the end of 2 epochs x 6 steps: lr at its floor
    caplog.set_level(logging.WARNING)
    trainer = trainer_for(shards, tmp_path / "run", epochs=4)
    text = caplog.text
    assert "optimization.epochs 2 -> 4" in text and "schedules are recomputed; at step 13" in text
    lr_now = trainer.lr_schedule.value(13)
    assert f"-> {lr_now:.4g}" in text
    trainer.close()


def test_rerunning_a_complete_run_trains_nothing_and_says_how_to_extend(shards, tmp_path, caplog):
    trainer = trainer_for(shards, tmp_path / "run", epochs=1)
    assert trainer.train() is True
    trainer.close()
    caplog.set_level(logging.INFO)
    again = trainer_for(shards, tmp_path / "run", epochs=1)
    assert again.complete and again.train() is True and again.step == 6
    assert "run complete: all 1 epochs (step 6)" in caplog.text and "optimization.epochs=2" in caplog.text
    assert "resumed from" not in caplog.text
    again.close()


def test_stop_at_step_messages_do_not_promise_a_resume(shards, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    stopped_run(shards, tmp_path / "run", stop_at=2)
    assert "stopped at optimization.stop_at_step=2 (step 2)" in caplog.text
    assert "raise or remove optimization.stop_at_step" in caplog.text and "same command" not in caplog.text
    caplog.clear()
    stopped_run(shards, tmp_path / "run", stop_at=2)
    assert "nothing to train: the checkpoint is at step 2 and optimization.stop_at_step=2" in caplog.text
