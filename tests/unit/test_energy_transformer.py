"""Energy transformer: the energy by hand, its gradient against autograd, and the encoder/predictor contract."""

import math
import re

import pytest
import torch

from ijepa_scale.masks import MultiBlockMaskCollator
from ijepa_scale.models.energy_transformer import EnergyBlock, EnergyPredictor, EnergyTransformer


def test_energy_by_hand():
    block = EnergyBlock(2, num_heads=1, head_dim=1, hidden_dim=1)
    with torch.no_grad():
        block.wq.copy_(torch.tensor([[[1.0, 0.0]]]))
        block.wk.copy_(torch.tensor([[[0.0, 1.0]]]))
        block.betas.fill_(1.0)
        block.memories.copy_(torch.tensor([[1.0], [0.0]]))
        block.hopfield_beta.fill_(1.0)
    g = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    # q = (1, 3), k = (2, 4): scores [[2, 4], [6, 12]]; Hopfield hidden (1, 3)
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))
    expected = -(lse(2, 4) + lse(6, 12)) - 0.5 * (1 + 9)
    assert block.energy(g).item() == pytest.approx(expected, rel=1e-6)
    # halving beta_h: -(1/b) lse(b * scores)
    with torch.no_grad():
        block.betas.fill_(0.5)
    expected_half = -2 * (lse(1, 2) + lse(3, 6)) - 5
    assert block.energy(g).item() == pytest.approx(expected_half, rel=1e-6)


@pytest.mark.parametrize("hopfield", ["relu", "softmax"])
def test_closed_form_gradient_matches_autograd(hopfield):
    torch.manual_seed(0)
    block = EnergyBlock(6, num_heads=2, head_dim=3, hidden_dim=5, hopfield=hopfield, init_std=0.5).double()
    with torch.no_grad():
        block.hopfield_beta.fill_(0.7)
        block.betas.copy_(torch.tensor([0.4, 1.3]))
    g = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    (by_autograd,) = torch.autograd.grad(block.energy(g), g)
    assert by_autograd.abs().max() > 0.1
    assert torch.allclose(block.energy_gradient(g), by_autograd, atol=1e-10)
    # and the block's own autograd path returns the same
    assert torch.allclose(block.autograd_gradient(g.detach()), by_autograd, atol=1e-10)


def _masks(batch):
    coll = MultiBlockMaskCollator(input_size=16, patch_size=4, enc_mask_scale=(0.85, 1.0),
                                  pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=2,
                                  min_keep=2, allow_overlap=False, seed=0)
    return coll.sample(batch, 0)


def _pair(gradient):
    torch.manual_seed(0)
    enc = EnergyTransformer(img_size=16, patch_size=4, embed_dim=8, num_heads=2, hidden_dim=16, steps=2,
                            gradient=gradient)
    pred = EnergyPredictor(enc.num_patches, embed_dim=8, predictor_embed_dim=8, num_heads=2, hidden_dim=16,
                           steps=2, gradient=gradient)
    for module in (enc, pred):  # larger weights than the near-identity init, so the energy terms matter
        with torch.no_grad():
            module.block.wq.normal_(0, 0.3)
            module.block.wk.normal_(0, 0.3)
            module.block.memories.normal_(0, 0.3)
    return enc, pred


def test_encoder_and_predictor_shapes_and_second_order_training_gradients():
    images = torch.randn(3, 3, 16, 16)
    masks_enc, masks_pred = _masks(3)
    results = {}
    for gradient in ("autograd", "analytic"):
        enc, pred = _pair(gradient)
        z = enc(images, masks_enc)
        assert z.shape == (3, masks_enc[0].shape[1], 8)
        out = pred(z, masks_enc, masks_pred)
        assert out.shape == (2 * 3, masks_pred[0].shape[1], 8)
        assert enc(images).shape == (3, 16, 8)
        out.pow(2).mean().backward()
        results[gradient] = (out.detach(), enc.block.wq.grad.clone(), enc.block.betas.grad.clone())
        # the energy parameters only act through dE/dg, so their gradients need create_graph
        assert enc.block.wq.grad.abs().sum() > 0 and enc.block.memories.grad.abs().sum() > 0
        with torch.no_grad():
            assert torch.allclose(enc(images, masks_enc), z, atol=1e-6)
    for a, b in zip(results["autograd"], results["analytic"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# meta.model_name=energy_transformer: config, builders, no-grad use, parallel wrapping, eval, formats
# ------------------------------------------------------------------------------------------------
from ijepa_scale.config import ConfigError, config_from_dict  # noqa: E402
from ijepa_scale.errors import UserError  # noqa: E402
from ijepa_scale.models import build_encoder, build_predictor  # noqa: E402
from ijepa_scale.models.energy_transformer import EnergyConfig  # noqa: E402
from ijepa_scale.distributed.parallel import ParallelPlan, parallelize, transformer_blocks  # noqa: E402

TINY_ENERGY = EnergyConfig(steps=3, pred_steps=2, hidden_dim=40, pred_hidden_dim=24, hopfield="softmax")


def _config(energy=None, compile=False, **meta):
    raw = {"data": {"shards": "x.tar", "crop_size": 16}, "mask": {"patch_size": 4},
           "meta": {"model_name": "energy_transformer", "embed_dim": 8, "num_heads": 2, "pred_emb_dim": 8, **meta},
           "distributed": {"compile": compile}}
    if energy is not None:
        raw["energy"] = energy
    return config_from_dict(raw)


def test_energy_section_is_read_and_validated_with_one_line_errors():
    cfg = _config({"steps": 4, "alpha": 0.05, "gradient": "analytic"})
    assert (cfg.energy.steps, cfg.energy.alpha, cfg.energy.gradient, cfg.energy.pred_steps) == (4, 0.05, "analytic",
                                                                                               None)
    assert cfg.to_dict()["energy"]["steps"] == 4
    for energy, message in (({"steps": 0}, "energy.steps=0 must be > 0"),
                            ({"pred_steps": -1}, "energy.pred_steps=-1 must be > 0"),
                            ({"alpha": 0}, "energy.alpha=0.0 must be > 0"),
                            ({"hopfield": "tanh"}, "energy.hopfield='tanh' must be one of relu, softmax"),
                            ({"gradient": "jacrev"}, "energy.gradient='jacrev' must be one of autograd, analytic"),
                            ({"stepz": 2}, "unknown key 'energy.stepz' (did you mean 'energy.steps'?)")):
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            _config(energy)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"meta.depth=2 does not apply to energy_transformer: set energy.steps"):
        _config(depth=2)
    with pytest.raises(ConfigError, match=r"distributed.compile=true .* set energy.gradient=analytic"):
        _config(compile=True)
    assert _config({"gradient": "analytic"}, compile=True).distributed.compile
    with pytest.raises(ConfigError, match=r"meta.embed_dim=9 is not divisible by meta.num_heads=2"):
        _config(embed_dim=9)
    with pytest.raises(ConfigError, match=r"meta.model_name='vit_mini' is not a model; .*energy_transformer"):
        _config(model_name="vit_mini")


def test_builders_take_sizes_from_meta_and_the_rest_from_the_energy_section():
    enc = build_encoder("energy_transformer", img_size=16, patch_size=4, embed_dim=8, num_heads=2, energy=TINY_ENERGY)
    pred = build_predictor(enc, pred_depth=6, pred_emb_dim=12, energy=TINY_ENERGY)
    assert isinstance(enc, EnergyTransformer) and isinstance(pred, EnergyPredictor)
    assert (enc.steps, enc.embed_dim, enc.num_heads, enc.block.hopfield) == (3, 8, 2, "softmax")
    assert enc.block.memories.shape == (8, 40) and enc.block.wq.shape == (2, 4, 8)
    assert pred.steps == 2 and pred.block.memories.shape == (12, 24) and pred.block.wq.shape == (2, 6, 12)
    default = build_encoder("energy_transformer", img_size=32, patch_size=16)  # EnergyIJepa's sizes
    assert (default.embed_dim, default.num_heads, default.steps, default.block.memories.shape[1]) == (256, 8, 6, 2048)
    assert build_predictor(default, 6, 256).steps == 6  # pred_steps defaults to steps
    with pytest.raises(ValueError, match="energy.steps"):
        build_encoder("energy_transformer", img_size=16, patch_size=4, depth=2)
    # a ViT ignores the section
    vit = build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=12, depth=1, num_heads=2, energy=TINY_ENERGY)
    assert len(vit.blocks) == 1 and len(build_predictor(vit, 2, 12, energy=TINY_ENERGY).predictor_blocks) == 2


def test_scalar_parameters_are_one_dimensional_so_they_skip_weight_decay():
    from ijepa_scale.training.optim import official_param_groups

    enc, pred = _pair("autograd")
    groups = official_param_groups(enc, pred)
    no_decay = {id(p) for g in groups if g.get("WD_exclude") for p in g["params"]}
    for module in (enc, pred):
        assert id(module.block.hopfield_beta) in no_decay and id(module.block.betas) in no_decay
        assert id(module.block.wq) not in no_decay


@pytest.mark.parametrize("gradient", ["autograd", "analytic"])
def test_no_grad_and_inference_mode_give_the_training_forward_without_a_graph(gradient):
    enc, pred = _pair(gradient)
    images = torch.randn(2, 3, 16, 16)
    masks_enc, masks_pred = _masks(2)
    z = enc(images, masks_enc)
    out = pred(z, masks_enc, masks_pred)
    assert z.requires_grad and out.requires_grad
    with torch.no_grad():  # the target encoder's forward in the trainer, the evaluation's features
        z_ng = enc(images, masks_enc)
        out_ng = pred(z_ng, masks_enc, masks_pred)
    with torch.inference_mode():  # autograd cannot run here; the closed form stands in
        z_inf = enc(images, masks_enc)
        out_inf = pred(z_inf, masks_enc, masks_pred)
    for tensor in (z_ng, out_ng, z_inf, out_inf):
        assert not tensor.requires_grad and tensor.grad_fn is None
    assert torch.allclose(z_ng, z, atol=1e-6) and torch.allclose(out_ng, out, atol=1e-6)
    assert torch.allclose(z_inf, z, atol=1e-5) and torch.allclose(out_inf, out, atol=1e-5)
    assert (out - pred(enc(images, masks_enc).detach(), masks_enc, masks_pred)).abs().max() == 0


def test_frozen_input_with_trainable_block_still_gets_second_order_parameter_gradients():
    block = EnergyBlock(6, num_heads=2, hidden_dim=5, init_std=0.5)
    x = torch.randn(2, 3, 6)  # no requires_grad: only the block's parameters are trained
    block(x, steps=2, alpha=0.1).square().sum().backward()
    assert block.wq.grad is not None and block.wq.grad.abs().sum() > 0


def test_parallel_wrapping_finds_the_shared_block_checkpoints_it_and_refuses_compile_of_autograd():
    enc, pred = _pair("autograd")
    assert transformer_blocks(enc) == [enc.block] and transformer_blocks(pred) == [pred.block]
    with pytest.raises(UserError,
                       match=r"distributed.compile=true .*energy.gradient=analytic or distributed.compile=false"):
        parallelize(enc, torch.device("cpu"), ParallelPlan(compile=True))
    images = torch.randn(2, 3, 16, 16)
    plain, _ = _pair("autograd")
    checkpointed = parallelize(_pair("autograd")[0], torch.device("cpu"), ParallelPlan(activation_checkpointing=True))
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    for model in (plain, checkpointed):
        model(images).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8), name


def test_eval_builds_the_energy_encoder_from_the_saved_config_and_vit_formats_refuse_it(tmp_path):
    from ijepa_scale.evaluation.evaluate import build_eval_encoder
    from ijepa_scale.evaluation.features import pooled_features
    from ijepa_scale.weights.load import load_encoder

    cfg = _config({"steps": 2, "hidden_dim": 16, "hopfield": "softmax"})
    torch.manual_seed(0)
    enc = build_encoder("energy_transformer", img_size=16, patch_size=4, embed_dim=8, num_heads=2, energy=cfg.energy)
    path = tmp_path / "jepa-latest.pth.tar"
    weights = {f"module.{k}": v for k, v in enc.state_dict().items()}
    torch.save({"target_encoder": weights, "encoder": weights, "config": cfg.to_dict(), "step": 1}, path)
    loaded, img_size = build_eval_encoder(path, "target_encoder")
    assert isinstance(loaded, EnergyTransformer) and img_size == 16 and not loaded.training
    assert (loaded.steps, loaded.block.hopfield, loaded.block.memories.shape[1]) == (2, "softmax", 16)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(pooled_features(loaded, images), enc(images).mean(dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="pool=last4 needs a ViT encoder"):
        pooled_features(loaded, images, pool="last4")
    with pytest.raises(UserError, match="energy-transformer weights .* `ijepa-scale eval"):
        load_encoder(str(path))
    from ijepa_scale.commands.export import main as export_main

    assert export_main([str(path), str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert not (tmp_path / "hf").exists()
    assert export_main([str(path), str(tmp_path / "official.pth.tar"), "--format", "official"]) == 2
    assert not (tmp_path / "official.pth.tar").exists()


def _bench_cfg(**meta):
    return config_from_dict({
        "data": {"batch_size": 4, "crop_size": 32, "shards": "unused.tar"},
        "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3], "min_keep": 2,
                 "aspect_ratio": [0.75, 1.5], "num_pred_masks": 2},
        "meta": {"embed_dim": 48, "num_heads": 3, "pred_depth": 1, "pred_emb_dim": 24, **meta},
        "energy": {"steps": 2, "hidden_dim": 96}})


def test_bench_step_counts_the_energy_step_and_times_it_against_the_vit_interleaved():
    import io

    from torch.utils.flop_counter import FlopCounterMode

    from ijepa_scale.benchmarks import step

    cfg = _bench_cfg(model_name="energy_transformer")
    models = step.build_models(cfg, torch.device("cpu"))
    masks_enc, masks_pred = MultiBlockMaskCollator(
        input_size=32, patch_size=8, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.3),
        aspect_ratio=(0.75, 1.5), nenc=1, npred=2, min_keep=2, seed=0).sample(4, 0)
    with FlopCounterMode(display=False) as counter:
        step.our_step(models, torch.randn(4, 3, 32, 32), masks_enc, masks_pred, cfg, torch.device("cpu"), 0.99, {})
    estimate = step.step_flops(cfg, masks_enc[0].shape[1], masks_pred[0].shape[1])
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.1)

    out = io.StringIO()
    result = step.run(cfg, torch.device("cpu"), steps=1, warmup=0, out=out,
                      vs=_bench_cfg(model_name="vit_tiny", depth=2))
    assert result["vs_step_ms"] > 0 and result["vs_ratio"] > 0
    assert set(result["vs_phases_ms"]) == set(step.PHASES)
    assert "energy steps 2/2, gradient autograd" in out.getvalue() and "vs vit_tiny (depth 2)" in out.getvalue()


def test_plan_refuses_the_energy_model_with_one_line(tmp_path, capsys):
    from ijepa_scale.commands import plan

    config = tmp_path / "c.yaml"
    config.write_text("data: {shards: x.tar}\nmeta: {model_name: energy_transformer, pred_emb_dim: 64}\n")
    assert plan.main(["--fname", str(config)]) == 2
    assert "plan models ViT memory only" in capsys.readouterr().err
