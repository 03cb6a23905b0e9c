"""Tests for ijepa_scale.weights (loading, official format) using tiny checkpoints in the official format."""

from __future__ import annotations

import argparse
import copy
import hashlib
import os

import pytest
import torch

from ijepa_scale.models import build_encoder, build_predictor
from ijepa_scale.weights import load_checkpoint, load_encoder, load_predictor
from ijepa_scale.weights.official import infer_encoder_config, infer_predictor_config, strip_prefixes


def with_prefix(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


def perturb_(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    encoder = perturb_(build_encoder("vit_tiny", 32, 8, depth=2), 1).eval()
    predictor = perturb_(build_predictor(encoder, pred_depth=2, pred_emb_dim=96), 2).eval()
    target = perturb_(copy.deepcopy(encoder), 3).eval()
    return encoder, predictor, target


def official_checkpoint(encoder, predictor, target, prefix="module."):
    opt = torch.optim.AdamW(
        [{"params": list(encoder.parameters())}, {"params": [], "WD_exclude": True,
                                                  "weight_decay": 0}]
    )
    return {
        "encoder": with_prefix(encoder.state_dict(), prefix),
        "predictor": with_prefix(predictor.state_dict(), prefix),
        "target_encoder": with_prefix(target.state_dict(), prefix),
        "opt": opt.state_dict(),
        "scaler": None,
        "epoch": 3,
        "loss": 0.1234,
        "batch_size": 128,
        "world_size": 16,
        "lr": 0.001,
    }


@pytest.fixture(scope="module")
def ckpt_path(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "jepa-latest.pth.tar"
    torch.save(official_checkpoint(*models), path)
    return path


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(7)
    img = torch.randn(2, 3, 32, 32, generator=gen)
    masks_x = [torch.stack([torch.randperm(16, generator=gen)[:6] for _ in range(2)])]
    masks = [torch.stack([torch.randperm(16, generator=gen)[:3] for _ in range(2)])
             for _ in range(4)]
    return img, masks_x, masks


# --------------------------------------------------------------------------------------------
def test_load_checkpoint_reads_official_format(ckpt_path):
    ckpt = load_checkpoint(ckpt_path)
    assert set(ckpt) == {"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch",
                         "loss", "batch_size", "world_size", "lr"}
    assert ckpt["epoch"] == 3 and ckpt["opt"]["param_groups"][1]["WD_exclude"] is True
    assert next(iter(ckpt["encoder"])).startswith("module.")


def test_load_encoder_and_predictor_bitwise(models, ckpt_path, inputs):
    encoder, predictor, target = models
    img, masks_x, masks = inputs
    loaded_target = load_encoder(ckpt_path)
    loaded_encoder = load_encoder(ckpt_path, key="encoder")
    loaded_pred = load_predictor(ckpt_path)
    assert not loaded_target.training and not loaded_pred.training
    assert (loaded_target.embed_dim, loaded_target.num_heads, len(loaded_target.blocks),
            loaded_target.patch_size, loaded_target.num_patches) == (192, 3, 2, 8, 16)
    assert loaded_target.pos_embed.requires_grad is False
    with torch.no_grad():
        assert torch.equal(loaded_target(img), target(img))
        z = loaded_encoder(img, masks_x)
        assert torch.equal(z, encoder(img, masks_x))
        assert torch.equal(loaded_pred(z, masks_x, masks), predictor(z, masks_x, masks))
        assert not torch.equal(loaded_target(img), loaded_encoder(img))


def test_loaded_dict_can_be_passed_as_source(models, ckpt_path, inputs):
    ckpt = load_checkpoint(ckpt_path)
    a, b = load_encoder(ckpt), load_encoder(ckpt)
    with torch.no_grad():
        a.blocks[0].attn.qkv.weight.add_(1.0)  # must not leak into b or ckpt
    assert torch.equal(b.blocks[0].attn.qkv.weight,
                       ckpt["target_encoder"]["module.blocks.0.attn.qkv.weight"])


def test_bare_state_dict_with_module_backbone_prefix(models, tmp_path, inputs):
    _, _, target = models
    path = tmp_path / "bare.pt"
    torch.save(with_prefix(target.state_dict(), "module.backbone."), path)
    loaded = load_encoder(path)
    with torch.no_grad():
        assert torch.equal(loaded(inputs[0]), target(inputs[0]))


@pytest.mark.parametrize("stored_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_cast_to_float32(models, tmp_path, inputs, stored_dtype):
    encoder, predictor, target = models
    low = {k: {n: t.to(stored_dtype) for n, t in sd.items()}
           for k, sd in official_checkpoint(encoder, predictor, target).items()
           if k in ("encoder", "predictor", "target_encoder")}
    path = tmp_path / "low.pth.tar"
    torch.save(low, path)
    enc, pred = load_encoder(path), load_predictor(path)
    assert {p.dtype for p in enc.parameters()} == {torch.float32}
    assert {p.dtype for p in pred.parameters()} == {torch.float32}
    for name, value in enc.state_dict().items():
        assert torch.equal(value, low["target_encoder"]["module." + name].float()), name
    # Rounded weights give different (but close) outputs.
    with torch.no_grad():
        out, ref = enc(inputs[0]), target(inputs[0])
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.1)
    bf16_enc = load_encoder(path, dtype=torch.bfloat16)
    assert bf16_enc.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


def test_file_url_goes_through_cache_and_checks_sha256(models, ckpt_path, tmp_path, inputs):
    _, _, target = models
    cache = tmp_path / "cache"
    url = ckpt_path.resolve().as_uri()
    assert url.startswith("file://")
    good = hashlib.sha256(ckpt_path.read_bytes()).hexdigest()

    loaded = load_encoder(url, cache_dir=cache, sha256=good)
    cached = [p for p in cache.iterdir() if p.suffix != ".json"]
    assert len(cached) == 1 and cached[0].name.endswith("jepa-latest.pth.tar")
    assert cached[0].read_bytes() == ckpt_path.read_bytes()
    with torch.no_grad():
        assert torch.equal(loaded(inputs[0]), target(inputs[0]))

    # A present cache entry is reused, not fetched again.
    os.utime(cached[0], (1, 1))
    load_checkpoint(url, cache_dir=cache)
    assert cached[0].stat().st_mtime == 1

    bad = "0" * 64
    other_cache = tmp_path / "cache2"
    with pytest.raises(ValueError, match=f"expected {bad}, got {good}"):
        load_checkpoint(url, cache_dir=other_cache, sha256=bad)
    assert list(other_cache.iterdir()) == []  # bad download deleted, no temp or lock files left

    # A corrupted cache entry is replaced when a checksum is given.
    cached[0].write_bytes(b"garbage")
    assert load_checkpoint(url, cache_dir=cache, sha256=good)["epoch"] == 3
    assert cached[0].read_bytes() == ckpt_path.read_bytes()


def test_default_cache_dir_from_env(ckpt_path, tmp_path, monkeypatch):
    monkeypatch.setenv("IJEPA_SCALE_CACHE", str(tmp_path / "envcache"))
    load_checkpoint(ckpt_path.resolve().as_uri())
    assert len([p for p in (tmp_path / "envcache").iterdir() if p.suffix != ".json"]) == 1


def test_local_sha256_mismatch_keeps_the_file(ckpt_path):
    with pytest.raises(ValueError, match="expected f+, actual"):
        load_checkpoint(ckpt_path, sha256="f" * 64)
    assert ckpt_path.exists()


def test_missing_files_raise_file_not_found(tmp_path):
    missing = tmp_path / "nope.pth.tar"
    with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError):
        load_encoder(str(missing))
    with pytest.raises(ValueError, match="no such file"):
        load_checkpoint(missing.as_uri(), cache_dir=tmp_path / "c")


def test_missing_key_lists_available_keys(ckpt_path):
    ckpt = load_checkpoint(ckpt_path)
    del ckpt["target_encoder"]
    with pytest.raises(KeyError, match="available keys.*'encoder'.*'predictor'"):
        load_encoder(ckpt)


def test_a_checkpoint_with_an_argparse_namespace_loads_safely(tmp_path, models):
    # MAE/DeiT-style files keep their command line as a Namespace: plain data, allowed by name.
    path = tmp_path / "ns.pt"
    torch.save({"encoder": models[0].state_dict(), "args": argparse.Namespace(a=1)}, path)
    assert load_checkpoint(path)["args"].a == 1


# --------------------------------------------------------------------------------------------
def test_strip_prefixes():
    sd = {"module.backbone.a": 1, "backbone.module.b": 2, "c": 3, "module.module.d": 4,
          "x.module.e": 5}
    assert strip_prefixes(sd) == {"a": 1, "b": 2, "c": 3, "d": 4, "x.module.e": 5}
    with pytest.raises(ValueError, match="collide"):
        strip_prefixes({"module.a": 1, "a": 2})


@pytest.mark.parametrize(
    "name,img,patch,heads,mlp_hidden",
    [("vit_huge", 224, 14, 16, 5120), ("vit_huge", 448, 16, 16, 5120),
     ("vit_giant", 224, 16, 16, 6144), ("vit_base", 224, 16, 12, 3072)],
)
def test_infer_encoder_config_for_official_sizes(name, img, patch, heads, mlp_hidden):
    with torch.device("meta"):
        enc = build_encoder(name, img, patch)
        pred = build_predictor(enc, pred_depth=12, pred_emb_dim=384)
    cfg = infer_encoder_config(with_prefix(enc.state_dict(), "module."))
    assert cfg["model_name"] == name
    assert (cfg["img_size"], cfg["patch_size"], cfg["num_heads"]) == (img, patch, heads)
    assert (cfg["embed_dim"], cfg["depth"]) == (enc.embed_dim, len(enc.blocks))
    assert int(cfg["embed_dim"] * cfg["mlp_ratio"]) == mlp_hidden
    pcfg = infer_predictor_config(pred.state_dict())
    assert pcfg == dict(num_patches=(img // patch) ** 2, embed_dim=enc.embed_dim,
                        predictor_embed_dim=384, depth=12, num_heads=heads, mlp_ratio=4.0)


def test_non_table_width_needs_num_heads(tmp_path, inputs):
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", 32, 8, embed_dim=48, depth=1, num_heads=4).eval()
    pred = build_predictor(enc, pred_depth=1, pred_emb_dim=24).eval()
    path = tmp_path / "odd.pt"
    torch.save(official_checkpoint(enc, pred, enc), path)
    with pytest.raises(ValueError, match="num_heads"):
        load_encoder(path)
    with pytest.raises(ValueError, match="num_heads"):
        load_predictor(path)
    loaded = load_encoder(path, num_heads=4)
    assert loaded.num_heads == 4 and infer_encoder_config(enc.state_dict(), 4)["model_name"] is None
    assert load_predictor(path, num_heads=4).num_heads == 4
    with torch.no_grad():
        assert torch.equal(loaded(inputs[0]), enc(inputs[0]))


def test_the_old_module_name_still_loads_with_a_deprecation_warning():
    import importlib
    import sys

    import ijepa_scale.weights as weights

    sys.modules.pop("ijepa_scale.pretrained", None)
    with pytest.warns(DeprecationWarning, match="ijepa_scale.weights"):
        pretrained = importlib.import_module("ijepa_scale.pretrained")
    for name in ("load_encoder", "load_predictor", "load_pretrained", "load_checkpoint", "fetch"):
        assert getattr(pretrained, name) is getattr(weights, name)
