import io
import json

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


def test_time_plan_gives_epoch_and_run_time_and_loader_cores():
    cfg = tiny_cfg()  # batch 4, 300 epochs (the default)
    t = plan.time_plan(cfg, gpus=2, imgs_per_s_per_gpu=10.0, images_per_epoch=1003, data_rate_per_core=40.0)
    assert t["steps_per_epoch"] == 125  # 1003 // (4 x 2): each rank drops its last partial batch
    assert t["epoch_s"] == pytest.approx(125 * 4 / 10.0)
    assert t["run_s"] == pytest.approx(t["epoch_s"] * cfg.optimization.epochs)
    assert t["gpu_hours"] == pytest.approx(t["run_s"] * 2 / 3600)
    assert t["cores_per_gpu"] == pytest.approx(0.25)
    with pytest.raises(plan.UserError, match="fill no step"):
        plan.time_plan(cfg, gpus=300, imgs_per_s_per_gpu=10.0, images_per_epoch=1003)


def test_step_rate_from_tflops_is_the_flop_rate_over_the_flops_per_image():
    cfg = tiny_cfg()
    rate = plan.step_rate_from_tflops(cfg, 1.0)
    k_ctx, k_tgt = plan.mean_tokens(cfg)
    assert rate * step.step_flops(cfg, k_ctx, k_tgt) / 4 == pytest.approx(1e12)


def test_plan_time_side_from_bench_step_and_bench_data_files(tmp_path, capsys):
    from ijepa_scale.commands import bench_step as bench_step_command

    config = tmp_path / "c.yaml"
    config.write_text("data: {shards: x.tar, batch_size: 4, crop_size: 32}\nmask: {patch_size: 8, min_keep: 2}\n"
                      "meta: {model_name: vit_tiny, embed_dim: 48, depth: 2, num_heads: 3, pred_depth: 1, "
                      "pred_emb_dim: 24}\noptimization: {epochs: 10}\n")
    bench = tmp_path / "step.json"
    assert bench_step_command.main(["--fname", str(config), "--steps", "1", "--warmup", "0", "--process-group",
                                    "--json", str(bench), "distributed.parallel=fsdp"]) == 0
    measured = json.loads(bench.read_text())
    assert measured["settings"]["parallel"] == "fsdp" and measured["settings"]["process_group"] is True
    data = tmp_path / "data.txt"  # bench-data's stdout, saved: its last line is the JSON summary
    data.write_text("table\n" + json.dumps({"results": [{"workers": 0, "pipeline_img_per_cpu_s": 100.0},
                                                        {"workers": 2, "pipeline_img_per_cpu_s": 80.0}]}) + "\n")
    capsys.readouterr()
    assert plan_command.main(["--fname", str(config), "--gpus", "2", "--sizes", "vit_tiny", "--from-bench", str(bench),
                              "--from-bench-data", str(data), "--images-per-epoch", "800"]) == 0
    text = capsys.readouterr().out
    rate = measured["images_per_s"]
    assert f"time: {rate:.1f} img/s per GPU (bench-step {bench}; measured with other settings: parallel fsdp " \
           "(plan: ddp)) x 2 GPUs, 800 images per epoch = 100 steps" in text
    assert f"{rate / 80.0:.2f} loader cores per GPU keep up at 80 img/s per core (bench-data {data})" in text


@pytest.mark.parametrize("args,message", [
    (["--imgs-per-s-per-gpu", "-3"], "--imgs-per-s-per-gpu -3: must be positive"),
    (["--from-bench", "MISSING"], "MISSING: cannot read bench-step output"),
    (["--from-bench-data", "NOTJSON"], "NOTJSON: no JSON line of bench-data"),
    (["--from-bench", "NOTJSON"], "no JSON line of bench-step in it; save one with"),
    (["--imgs-per-s-per-gpu", "5", "--images-per-epoch", "0"], "--images-per-epoch 0: must be positive"),
])
def test_plan_time_side_refuses_bad_inputs_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTJSON").write_text("just text\n")
    config = tmp_path / "c.yaml"
    config.write_text("data: {shards: x.tar, batch_size: 16}\n")
    assert plan_command.main(["--fname", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


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
