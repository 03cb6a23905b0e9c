"""The trainer's pieces in one process (world size 1): groups, schedules, EMA, precision."""

import pytest
import torch

from ijepa_scale.config import config_from_dict
from ijepa_scale.distributed.env import DistEnv
from ijepa_scale.training.trainer import Trainer


def make_trainer(shards, folder, batch_size=4, **meta):
    cfg = config_from_dict({
        "data": {"batch_size": batch_size, "crop_size": 32, "num_workers": 0, "shards": shards, "pin_mem": False},
        "logging": {"folder": str(folder)},
        "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3],
                 "aspect_ratio": [0.75, 1.5], "num_pred_masks": 2, "min_keep": 2},
        "meta": {"model_name": "vit_tiny", "embed_dim": 48, "depth": 1, "num_heads": 3, "pred_depth": 1,
                 "pred_emb_dim": 24, **meta},
        "optimization": {"epochs": 2, "warmup": 1, "ema": [0.9, 1.0]},
    })
    return Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def test_param_groups_follow_official_weight_decay_rules(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path)
    groups = trainer.optimizer.param_groups
    assert len(groups) == 4
    assert [g.get("WD_exclude", False) for g in groups] == [False, False, True, True]
    names = {id(p): n for n, p in trainer.networks["predictor"].named_parameters()}
    decayed_predictor = {names[id(p)] for p in groups[1]["params"]}
    assert "mask_token" in decayed_predictor  # as official: 3-D, so it is decayed
    assert all(p.ndim == 1 for g in groups[2:] for p in g["params"])
    trainer.close()


def test_train_step_sets_schedules_and_updates_target_by_ema(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path)
    target_before = [p.detach().clone() for p in trainer.ema_networks["target_encoder"].parameters()]
    batch = next(iter(trainer.stream.epoch_batches()))
    metrics = trainer.train_step(batch)
    assert trainer.step == 1 and metrics["step"] == 1
    assert metrics["lr"] == trainer.lr_schedule.value(1)
    groups = trainer.optimizer.param_groups
    assert groups[0]["weight_decay"] == metrics["wd"] and groups[2]["weight_decay"] == 0
    momentum = metrics["momentum"]
    assert momentum == 0.9  # first step uses ema[0]
    for before, target, online in zip(target_before, trainer.ema_networks["target_encoder"].parameters(),
                                       trainer.networks["encoder"].parameters()):
        expected = before * momentum + online.detach() * (1 - momentum)
        assert torch.allclose(target, expected, atol=1e-7)
    assert any(not torch.equal(b, t) for b, t in zip(target_before, trainer.ema_networks["target_encoder"].parameters()))
    trainer.close()


def test_bfloat16_runs_without_grad_scaler(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path, use_bfloat16=True)
    assert trainer.dtype == "bfloat16" and trainer.scaler is None
    batch = next(iter(trainer.stream.epoch_batches()))
    metrics = trainer.train_step(batch)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
    # master weights stay float32 under autocast
    assert all(p.dtype == torch.float32 for p in trainer.networks["encoder"].parameters())
    trainer.close()


def test_float16_uses_a_grad_scaler(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path, dtype="float16")
    assert trainer.scaler is not None
    trainer.close()


def test_l2_loss_is_the_paper_objective(shards, tmp_path):
    from ijepa_scale.data.transforms import normalize
    from ijepa_scale.objectives import IJEPAObjective

    trainer = make_trainer(shards, tmp_path)
    batch = next(iter(trainer.stream.epoch_batches()))
    args = (trainer.networks["encoder"], trainer.networks["predictor"], trainer.ema_networks["target_encoder"], normalize(batch["images"]),
            batch["masks_enc"], batch["masks_pred"])
    with torch.no_grad():
        smooth, _ = IJEPAObjective("smooth_l1").losses(*args)
        l2, _ = IJEPAObjective("l2").losses(*args)
        z = IJEPAObjective().predictions(*args[:2], *args[3:])
        h = IJEPAObjective().targets(*args[2:])
    assert torch.allclose(l2, ((z - h) ** 2).mean())
    if (z - h).abs().max() < 1:  # smooth-L1 with beta 1 is half the squared error below 1
        assert torch.allclose(l2, 2 * smooth, rtol=1e-5)
    trainer.close()


def test_epoch_boundary_resume_with_new_batch_size_keeps_schedule_position(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path)
    assert trainer.steps_per_epoch == 6
    for batch in trainer.stream.epoch_batches():
        trainer.train_step(batch)
    state = trainer.state_dict()
    trainer.close()
    resumed = make_trainer(shards, tmp_path / "other", batch_size=8)
    assert resumed.steps_per_epoch == 3
    resumed.load_state_dict(state)
    # One epoch done: the schedules continue at 1 * (new steps per epoch), as official.
    assert resumed.lr_schedule.step_count == 3 and resumed.momentum_schedule.step_count == 3
    assert resumed.step == 6 and resumed.stream.epoch == 1
    resumed.close()


def test_batch_without_decodable_sample_is_skipped_not_trained(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path)
    batch = next(iter(trainer.stream.epoch_batches()))
    before = [p.detach().clone() for p in trainer.networks["encoder"].parameters()]
    metrics = trainer.train_step(dict(batch, usable=False))
    assert metrics["skipped_steps"] == 1 and metrics["loss"] != metrics["loss"]  # NaN
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.networks["encoder"].parameters()))
    trainer.close()


def test_resume_from_an_official_format_checkpoint(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path / "ours")
    state = trainer.state_dict()
    trainer.close()
    official = {k: state[k] for k in ("encoder", "predictor", "target_encoder", "opt", "scaler", "loss",
                                      "batch_size", "world_size", "lr")}
    official["epoch"] = 1
    folder = tmp_path / "official"
    folder.mkdir()
    torch.save(official, folder / "jepa-latest.pth.tar")
    resumed = make_trainer(shards, folder)
    assert resumed.step == resumed.steps_per_epoch and resumed.stream.epoch == 1
    assert resumed.lr_schedule.step_count == resumed.steps_per_epoch
    for name, tensor in state["encoder"].items():
        assert torch.equal(resumed.networks["encoder"].state_dict()[name[len("module."):]], tensor)
    assert resumed.checkpoints.lineage == [{"file": "jepa-latest.pth.tar", "step": None}]
    resumed.close()


def test_gradient_clipping_bounds_the_update_norm(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path)
    trainer.cfg.optimization.clip_grad = 1e-3
    batch = next(iter(trainer.stream.epoch_batches()))
    captured = {}
    original_step = trainer.optimizer.step

    def step_and_capture(*args, **kwargs):
        grads = [p.grad for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
        captured["norm"] = float(torch.nn.utils.get_total_norm(grads))
        return original_step(*args, **kwargs)

    trainer.optimizer.step = step_and_capture
    metrics = trainer.train_step(batch)
    assert metrics["grad_norm"] > 1e-3  # the logged norm is before clipping
    assert captured["norm"] == pytest.approx(1e-3, rel=1e-3)
    trainer.close()


def test_slow_notice_logs_only_a_slow_wait_and_its_end_once(caplog):
    import time as _time

    from ijepa_scale.training.progress import slow_notice

    caplog.set_level("INFO", logger="ijepa_scale")
    with slow_notice("fast thing", after=5.0):
        pass
    notice = slow_notice("slow thing", after=0.01).start()
    deadline = _time.monotonic() + 5.0
    while not any("still waiting" in r.getMessage() for r in caplog.records) and _time.monotonic() < deadline:
        _time.sleep(0.01)
    notice.stop()
    notice.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("fast thing" in m for m in messages)
    assert [m.split(":")[0] for m in messages if "slow thing" in m] == ["slow thing", "slow thing"]
    assert "still waiting after 0 s" in messages[0] and "done after" in messages[1]


def test_a_rank_far_slower_for_its_data_is_named_a_straggler():
    from ijepa_scale.training.trainer import straggler_text

    assert straggler_text([12.0, 900.0, 15.0, 10.0]).startswith("straggler: rank 1 waited 900 ms for its data "
                                                                  "(the others 12 ms)")
    assert straggler_text([12.0, 30.0, 15.0]) == ""  # under the floor: noise
    assert straggler_text([400.0, 700.0]) == ""  # not 3x the others: everyone waits
    assert straggler_text([900.0]) == ""
