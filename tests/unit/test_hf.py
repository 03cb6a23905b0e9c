"""Hugging Face interop, both ways, against the real transformers library; official export."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ijepa_scale.commands.export import main as export_main
from ijepa_scale.models import build_encoder, build_predictor
from ijepa_scale.weights import load_checkpoint, load_encoder, load_pretrained
from ijepa_scale.weights.hf import hf_to_official, official_to_hf, read_hf
from tests.unit.test_pretrained import official_checkpoint, perturb_

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    encoder = perturb_(build_encoder("vit_tiny", 32, 8, depth=2), 1).eval()
    predictor = perturb_(build_predictor(encoder, pred_depth=2, pred_emb_dim=96), 2).eval()
    target = perturb_(copy.deepcopy(encoder), 3).eval()
    return encoder, predictor, target


@pytest.fixture(scope="module")
def official_file(nets, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "IN1K-tiny.pth.tar"
    torch.save(official_checkpoint(*nets), path)
    return path


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def hf_model(path):
    model, info = transformers.IJepaModel.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("key", ["target_encoder", "encoder"])
def test_export_hf_loads_in_transformers_with_the_same_hidden_state(nets, official_file, images, tmp_path, key):
    out = tmp_path / "hf"
    assert export_main([str(official_file), str(out), "--format", "hf", "--key", key]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["layer_norm_eps"], config["num_attention_heads"], config["hidden_size"]) == (1e-6, 3, 192)
    model = hf_model(out)
    ours = nets[2] if key == "target_encoder" else nets[0]
    with torch.no_grad():
        theirs = model(pixel_values=images).last_hidden_state
        torch.testing.assert_close(theirs, ours(images), atol=2e-5, rtol=1e-4)


def test_transformers_model_loads_here_from_a_dir_and_a_safetensors_file(images, tmp_path):
    torch.manual_seed(1)
    config = transformers.IJepaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    model = transformers.IJepaModel(config).eval()
    model.save_pretrained(tmp_path / "hub")
    with torch.no_grad():
        ref = model(pixel_values=images).last_hidden_state
        for source in (tmp_path / "hub", tmp_path / "hub" / "model.safetensors"):
            encoder = load_encoder(source)
            assert (encoder.embed_dim, encoder.num_heads, len(encoder.blocks)) == (64, 4, 2)
            torch.testing.assert_close(encoder(images), ref, atol=2e-5, rtol=1e-4)
    # An HF source has one encoder: load_pretrained names it `encoder`.
    assert set(load_pretrained(tmp_path / "hub")) == {"encoder"}


def test_key_maps_round_trip_and_match_the_hub_names(nets):
    state = nets[0].state_dict()
    hub = official_to_hf(state)
    assert "encoder.layer.1.attention.attention.query.weight" in hub
    assert "embeddings.position_embeddings" in hub and "layernorm.weight" in hub
    back = hf_to_official(hub)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    v5 = {k.replace("encoder.layer.", "layers.").replace("attention.attention.query", "attention.q_proj")
          .replace("attention.attention.key", "attention.k_proj").replace("attention.attention.value", "attention.v_proj")
          .replace("attention.output.dense", "attention.o_proj").replace("intermediate.dense", "mlp.fc1")
          .replace("output.dense", "mlp.fc2"): v for k, v in hub.items()}
    assert all(torch.equal(hf_to_official(v5)[k], state[k]) for k in state)


def test_read_hf_refuses_another_layer_norm_eps(nets, official_file, tmp_path):
    out = tmp_path / "hf"
    export_main([str(official_file), str(out), "--format", "hf"])
    config = json.loads((out / "config.json").read_text())
    config["layer_norm_eps"] = 1e-12
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer_norm_eps"):
        read_hf(out)


def test_export_official_from_our_checkpoint_and_from_hf(nets, official_file, tmp_path, images):
    ours = dict(official_checkpoint(*nets), step=12, config={"meta": {"model_name": "vit_tiny"}}, lineage=[])
    src = tmp_path / "jepa-latest.pth.tar"
    torch.save(ours, src)
    out = tmp_path / "official.pth.tar"
    assert export_main([str(src), str(out), "--format", "official"]) == 0
    written = torch.load(out, weights_only=True)
    assert set(written) == {"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss",
                            "batch_size", "world_size", "lr"}
    assert all(k.startswith("module.") for net in ("encoder", "predictor", "target_encoder") for k in written[net])
    nets_back = load_pretrained(out)
    with torch.no_grad():
        assert torch.equal(nets_back["target_encoder"](images), nets[2](images))
    # From Hugging Face: only the encoder exists.
    assert export_main([str(official_file), str(tmp_path / "hf"), "--format", "hf", "--key", "encoder"]) == 0
    assert export_main([str(tmp_path / "hf"), str(tmp_path / "from_hf.pth.tar"), "--format", "official"]) == 0
    from_hf = load_checkpoint(tmp_path / "from_hf.pth.tar")
    assert set(k for k in from_hf if isinstance(from_hf[k], dict)) == {"encoder"}
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(from_hf, key="encoder")(images), nets[0](images))
