import io

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ijepa_scale.benchmarks import plan, step
from ijepa_scale.commands import plan as plan_command
from ijepa_scale.config import config_from_dict


def tiny_cfg(**meta):
    return config_from_dict({
        "data": {"batch_size": 4, "crop_size": 32, "shards": "unused.tar"},
        "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3], "min_keep": 2,
                 "aspect_ratio": [0.75, 1.5], "num_pred_masks": 2},
        "meta": {"model_name": "vit_tiny", "embed_dim": 48, "depth": 2, "num_heads": 3, "pred_depth": 1,
                 "pred_emb_dim": 24, **meta},
    })


def test_step_flops_match_what_torch_counts_in_the_step():
    cfg = tiny_cfg()
    models = step.build_models(cfg, torch.device("cpu"))
    from ijepa_scale.masks import MultiBlockMaskCollator

    collator = MultiBlockMaskCollator(input_size=32, patch_size=8, enc_mask_scale=(0.85, 1.0),
                                      pred_mask_scale=(0.15, 0.3), aspect_ratio=(0.75, 1.5), nenc=1, npred=2,
                                      min_keep=2, seed=0, rank=0)
    masks_enc, masks_pred = collator.sample(4, step=0)
    images = torch.randn(4, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        step.our_step(models, images, masks_enc, masks_pred, cfg, torch.device("cpu"), 0.99, {})
    estimate = step.step_flops(cfg, masks_enc[0].shape[1], masks_pred[0].shape[1])
    # The counter also sees the collapse metrics' small matmuls and misses nothing we count.
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.1)


def test_bench_step_runs_ours_and_the_official_step_and_reports_every_phase():
    out = io.StringIO()
    result = step.run(tiny_cfg(), torch.device("cpu"), steps=1, warmup=0, vs_official=True, out=out)
    assert set(result["phases_ms"]) == set(step.PHASES) and all(v > 0 for v in result["phases_ms"].values())
    assert result["official_step_ms"] > 0 and result["speedup_vs_official"] > 0
    assert 0 < result["mfu"] < 1.5
    assert "official-style step" in out.getvalue() and "MFU" in out.getvalue()


def test_plan_shards_state_under_fsdp_and_checkpointing_cuts_activations():
    cfg = tiny_cfg(dtype="bfloat16")
    e = plan.estimate(cfg, "vit_base", gpus=8, k_ctx=10, k_tgt=4)
    encoder, predictor = plan._models(cfg, "vit_base", override_dims=False)
    assert e["params"] == sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in predictor.parameters())
    assert e["fsdp"]["optimizer"] == pytest.approx(e["ddp"]["optimizer"] / 8)
    assert e["ddp"]["optimizer"] == 8 * e["params"]  # two float32 moments
    assert e["ddp_ac"]["activations"] < e["ddp"]["activations"]
    assert e["fsdp_ac"]["total"] < e["fsdp"]["total"] < e["ddp"]["total"]


def test_plan_command_prints_every_size_and_refuses_bad_arguments(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {shards: x.tar, batch_size: 16}\nmeta: {use_bfloat16: true}\n")
    assert plan_command.main(["--fname", str(config), "--gpus", "8", "--gpu-mem", "80"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("vit_tiny", "vit_huge", "vit_giant"))
    assert plan_command.main(["--fname", str(config), "--gpus", "0"]) == 2
    assert "--gpus 0" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_step_prints_the_dtype_split_of_a_profiled_step(dtype):
    cfg = tiny_cfg()
    cfg.distributed.dtype = dtype
    out = io.StringIO()
    result = step.run(cfg, torch.device("cpu"), steps=1, warmup=0, out=out)
    split = result["dtype_split"]
    assert sum(split["share"].values()) == pytest.approx(1.0)
    if dtype == "float32":
        assert split["share"]["low"] == 0 and split["casts"] == 0 and split["share"]["float32"] > 0.5
        assert "dtype split (op time, median of 3 profiled steps): float32" in out.getvalue()
    else:
        # Autocast casts weights and activations; every matmul and the patch convolution run in bfloat16.
        assert split["share"]["low"] > 0.3 and split["casts"] > 0 and split["low_flop_share"] > 0.9
        assert "bfloat16" in out.getvalue().splitlines()[4] and "casts" in out.getvalue()
