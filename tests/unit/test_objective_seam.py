"""meta.objective: config sections and aliases, what the trainer builds for each objective, its
checkpoints, starting one objective from another's weights, and evaluating any objective's run."""

import logging

import pytest
import torch
import yaml

from ijepa_scale.config import ConfigError, config_from_dict, load_config
from ijepa_scale.distributed.env import DistEnv
from ijepa_scale.errors import UserError
from ijepa_scale.evaluation.evaluate import build_eval_encoder, describe_checkpoint
from ijepa_scale.objectives import GatedObjective, IJEPAObjective, PKTObjective, SaccadeObjective
from ijepa_scale.training.trainer import Trainer
from tests.unit.test_trainer import make_trainer

BASE = {
    "data": {"batch_size": 4, "crop_size": 32, "num_workers": 0, "pin_mem": False},
    "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3],
             "aspect_ratio": [0.75, 1.5], "num_pred_masks": 2, "min_keep": 2},
    "meta": {"model_name": "vit_tiny", "embed_dim": 48, "depth": 2, "num_heads": 3, "pred_depth": 1,
             "pred_emb_dim": 24},
    "optimization": {"epochs": 2, "warmup": 1, "ema": [0.9, 1.0]},
}


def config(shards, folder, objective="ijepa", **sections):
    raw = {k: dict(v) for k, v in BASE.items()}
    raw["data"]["shards"] = shards
    raw["logging"] = {"folder": str(folder)}
    raw["meta"]["objective"] = objective
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def trainer_for(cfg):
    return Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def minimal(**sections):
    raw = {"data": {"shards": "x-{000000..000001}.tar"}, **sections}
    return config_from_dict(raw)


def test_objective_sections_are_validated_with_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"meta.objective='byol' must be one of ijepa, pkt, gated, saccade"):
        minimal(meta={"objective": "byol"})
    with pytest.raises(ConfigError, match=r"<config>: pkt.grouping='rows' is not one of image, chunks"):
        minimal(meta={"objective": "pkt"}, pkt={"grouping": "rows"})
    with pytest.raises(ConfigError, match=r"unknown key 'gated.lambda_gate' \(did you mean 'gated.lambda_gates'"):
        minimal(meta={"objective": "gated"}, gated={"lambda_gate": 1.0})
    with pytest.raises(ConfigError, match=r"saccade.backbone='resnet'"):
        minimal(meta={"objective": "saccade"}, saccade={"backbone": "resnet"})
    with pytest.raises(ConfigError, match=r"gated.gate_beta=0.0 must be positive"):
        minimal(gated={"gate_beta": 0})


def test_the_probabilistic_ijepa_loss_names_are_accepted():
    cfg = minimal(optimization={"loss_function": "L2_PKT"})
    assert cfg.meta.objective == "pkt" and cfg.pkt.grouping == "image" and not cfg.pkt.divide_by_chunks
    cfg = minimal(optimization={"loss_function": "L2_PKT_chunks"}, pkt={"chunk_rows": 64})
    assert cfg.meta.objective == "pkt" and cfg.pkt.grouping == "chunks" and cfg.pkt.divide_by_chunks
    assert cfg.pkt.chunk_rows == 64
    assert minimal(optimization={"loss_function": "L2"}).meta.objective == "ijepa"
    with pytest.raises(ConfigError, match="loss_function=L2_PKT is a loss of meta.objective=pkt, but meta.objective="
                                          "gated"):
        minimal(meta={"objective": "gated"}, optimization={"loss_function": "L2_PKT"})
    with pytest.raises(ConfigError, match="loss_function=L2_PKT means pkt.grouping=image, but pkt.grouping=chunks"):
        minimal(optimization={"loss_function": "L2_PKT"}, pkt={"grouping": "chunks"})
    with pytest.raises(ConfigError, match="loss_function='PKT' must be one of L2, L2_PKT, L2_PKT_chunks"):
        minimal(optimization={"loss_function": "PKT"})


def test_another_objectives_section_is_a_warning_and_not_saved(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"shards": "x.tar"}, "gated": {"lambda_gates": 2.0}}))
    with caplog.at_level(logging.WARNING, logger="ijepa_scale"):
        cfg = load_config(path)
    assert "section(s) gated are not read by meta.objective=ijepa, meta.model_name=vit_base" in caplog.text
    assert "gated" not in cfg.to_dict() and "pkt" not in cfg.to_dict()
    switched = load_config(path, ["meta.objective=gated"])
    assert switched.to_dict()["gated"]["lambda_gates"] == 2.0


@pytest.mark.parametrize("objective, cls, trained", [
    ("ijepa", IJEPAObjective, ("encoder", "predictor")),
    ("pkt", PKTObjective, ("encoder", "predictor")),
    ("gated", GatedObjective, ("student", "predictor")),
    ("saccade", SaccadeObjective, ("student", "predictor")),
])
def test_trainer_builds_the_objectives_networks_and_checkpoints_them(shards, tmp_path, objective, cls, trained):
    sections = {"saccade": {"crop_fraction": 0.75}} if objective == "saccade" else {}
    trainer = trainer_for(config(shards, tmp_path, objective, **sections))
    assert isinstance(trainer.objective, cls)
    assert tuple(trainer.networks) == trained and tuple(trainer.ema_networks) == ("target_encoder",)
    assert (trainer.batches.collator is not None) == (objective in ("ijepa", "pkt"))
    # One decayed and one excluded group per trained network; the teacher is not optimised.
    assert len(trainer.optimizer.param_groups) == 2 * len(trained)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in trainer.eval_encoder.parameters()}
    teacher_before = [p.clone() for p in trainer.eval_encoder.parameters()]
    metrics = trainer.train_step(next(iter(trainer.stream.epoch_batches())))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert set(trainer.objective.metric_names) <= set(metrics)
    # The EMA moved the teacher towards its online network.
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, trainer.eval_encoder.parameters()))
    state = trainer.state_dict()
    assert set(trained) | {"target_encoder", "opt"} <= set(state)
    assert state["config"]["meta"]["objective"] == objective
    trainer.close()


def test_resuming_with_another_objective_is_refused(shards, tmp_path):
    trainer = trainer_for(config(shards, tmp_path, "gated"))
    trainer.train_step(next(iter(trainer.stream.epoch_batches())))
    trainer.save()
    trainer.close()
    with pytest.raises(UserError, match="was trained with meta.objective=gated, this config sets meta.objective=pkt"):
        trainer_for(config(shards, tmp_path, "pkt"))
    resumed = trainer_for(config(shards, tmp_path, "gated"))
    assert resumed.step == 1
    resumed.close()


def test_a_gated_run_starts_from_an_ijepa_checkpoint(shards, tmp_path):
    source = make_trainer(shards, tmp_path / "ijepa", depth=2)
    source.train_step(next(iter(source.stream.epoch_batches())))
    state = source.state_dict()
    source.close()
    path = tmp_path / "ijepa.pth.tar"
    torch.save(state, path)
    trainer = trainer_for(config(shards, tmp_path / "gated", "gated", meta={"init_from": str(path)}))
    for name, tensor in trainer.networks["student"].encoder.state_dict().items():
        assert torch.equal(tensor, state["encoder"]["module." + name]), name
    for name, tensor in trainer.eval_encoder.state_dict().items():
        assert torch.equal(tensor, state["target_encoder"]["module." + name]), name
    trainer.close()
    with pytest.raises(UserError, match="lacks student, predictor of meta.objective=gated, so its optimizer state cannot fit"):
        trainer_for(config(shards, tmp_path / "gated2", "gated", meta={"init_from": str(path), "init_optimizer": True}))


@pytest.mark.parametrize("objective, sections, size", [
    ("gated", {}, 32),
    ("saccade", {"saccade": {"crop_fraction": 0.75}}, 24),
    ("saccade", {"data": {"crop_size": 56}, "saccade": {"backbone": "convnext_atto", "embed_dim": 16}}, 36),
])
def test_eval_builds_each_objectives_teacher(shards, tmp_path, objective, sections, size):
    trainer = trainer_for(config(shards, tmp_path, objective, **sections))
    state = trainer.state_dict()
    trainer.close()
    path = tmp_path / "run.pth.tar"
    torch.save(state, path)
    encoder, img_size = build_eval_encoder(path, "target_encoder")
    assert img_size == size
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, state["target_encoder"]["module." + name])
    from ijepa_scale.evaluation.features import pooled_features

    features = pooled_features(encoder, torch.rand(2, 3, size, size))
    assert features.shape == (2, 16 if "convnext" in str(sections) else 48)
    if objective == "gated":
        with pytest.raises(UserError, match="evaluated by its target_encoder"):
            build_eval_encoder(path, "student")
        from ijepa_scale.objectives.gated import GatedObjective

        trainer = trainer_for(config(shards, tmp_path, objective, **sections))  # same seed: the weights saved above
        nets = {k: v.eval() for k, v in trainer.networks.items()}
        images = torch.rand(2, 3, size, size)
        for mode in ("gated", "all_open"):
            model, _ = build_eval_encoder(path, mode)
            assert torch.equal(model(images), GatedObjective.features(nets, images, mode))
        trainer.close()
    else:
        with pytest.raises(UserError, match="--key gated evaluates a meta.objective=gated run"):
            describe_checkpoint(path, "gated")
