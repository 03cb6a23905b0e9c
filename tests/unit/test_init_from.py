"""meta.init_from: a new run starts from given weights, with schedules and data at zero."""

import pytest
import torch

from ijepa_scale.errors import UserError
from ijepa_scale.commands.export import main as export_main
from tests.unit.test_trainer import make_trainer


def trained_state(shards, folder):
    trainer = make_trainer(shards, folder)
    trainer.train_step(next(iter(trainer.stream.epoch_batches())))
    state = trainer.state_dict()
    trainer.close()
    return state


def official(state):
    return {k: state[k] for k in ("encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss",
                                  "batch_size", "world_size", "lr")}


def test_init_from_takes_weights_not_schedules_or_position(shards, tmp_path):
    state = trained_state(shards, tmp_path / "a")
    path = tmp_path / "src.pth.tar"
    torch.save(official(state), path)
    b = make_trainer(shards, tmp_path / "b", init_from=str(path))
    assert b.step == 0 and b.lr_schedule.step_count == 0 and b.stream.epoch == 0
    for key, module in (("encoder", b.networks["encoder"]), ("predictor", b.networks["predictor"]), ("target_encoder", b.ema_networks["target_encoder"])):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, state[key]["module." + name]), (key, name)
    assert b.optimizer.state_dict()["state"] == {}
    assert b.checkpoints.lineage == [{"init_from": str(path)}]
    b.close()
    c = make_trainer(shards, tmp_path / "c", init_from=str(path), init_optimizer=True)
    moments = c.optimizer.state_dict()["state"]
    assert moments and all(torch.equal(moments[i]["exp_avg"], state["opt"]["state"][i]["exp_avg"]) for i in moments)
    c.close()


def test_init_from_a_hugging_face_dir_starts_both_encoders(shards, tmp_path):
    state = trained_state(shards, tmp_path / "a")
    torch.save(official(state), tmp_path / "src.pth.tar")
    assert export_main([str(tmp_path / "src.pth.tar"), str(tmp_path / "hf"), "--format", "hf",
                        "--num-heads", "3"]) == 0
    b = make_trainer(shards, tmp_path / "b", init_from=str(tmp_path / "hf"))
    for name, tensor in b.ema_networks["target_encoder"].state_dict().items():
        assert torch.equal(tensor, state["target_encoder"]["module." + name]), name
        assert torch.equal(b.networks["encoder"].state_dict()[name], tensor), name
    b.close()


def test_shape_mismatch_names_the_tensor_and_the_setting(shards, tmp_path):
    state = trained_state(shards, tmp_path / "a")
    torch.save(official(state), tmp_path / "src.pth.tar")
    with pytest.raises(UserError, match=r"pos_embed has shape \[1, 16, 48\] there but \[1, 16, 96\].*meta.embed_dim"):
        make_trainer(shards, tmp_path / "b", init_from=str(tmp_path / "src.pth.tar"), embed_dim=96)
    torch.save(official(_deeper(state)), tmp_path / "deeper.pth.tar")
    with pytest.raises(UserError, match=r"unexpected \['blocks.1.attn.proj.bias'.*meta.depth"):
        make_trainer(shards, tmp_path / "c", init_from=str(tmp_path / "deeper.pth.tar"))
    with pytest.raises(UserError, match="meta.init_from=.*nope.*not found"):
        make_trainer(shards, tmp_path / "d", init_from=str(tmp_path / "nope.pth.tar"))


def _deeper(state):
    out = dict(state)
    out["encoder"] = dict(state["encoder"])
    for name, value in state["encoder"].items():
        if name.startswith("module.blocks.0."):
            out["encoder"][name.replace("blocks.0.", "blocks.1.")] = value
    return out
