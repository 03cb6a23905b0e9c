"""DDP and FSDP2 on 2 gloo ranks give the same training, with and without accumulation and
activation checkpointing (the same images and masks every step; see parallel_run.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.integration.common import ROOT, make_shards

pytestmark = pytest.mark.integration

VARIANTS = [
    {"name": "ddp", "batch": 8, "accum": 1},
    {"name": "ddp_ac", "batch": 8, "accum": 1, "overrides": {"distributed.activation_checkpointing": True}},
    {"name": "fsdp", "batch": 8, "accum": 1, "overrides": {"distributed.parallel": "fsdp"}},
    {"name": "fsdp_accum2", "batch": 4, "accum": 2, "overrides": {"distributed.parallel": "fsdp"}},
    {"name": "fsdp_accum2_ac", "batch": 4, "accum": 2,
     "overrides": {"distributed.parallel": "fsdp", "distributed.activation_checkpointing": True}},
    {"name": "fsdp_bf16", "batch": 8, "accum": 1,
     "overrides": {"distributed.parallel": "fsdp", "distributed.dtype": "bfloat16"}},
    {"name": "ddp_bf16", "batch": 8, "accum": 1, "overrides": {"distributed.dtype": "bfloat16"}},
    {"name": "ddp_bf16_tgt32", "batch": 8, "accum": 1,
     "overrides": {"distributed.dtype": "bfloat16", "distributed.target_dtype": "float32"}},
    {"name": "fsdp_bf16_tgt32", "batch": 8, "accum": 1,
     "overrides": {"distributed.parallel": "fsdp", "distributed.dtype": "bfloat16",
                   "distributed.target_dtype": "float32"}},
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    shards = make_shards(tmp / "shards")
    out = tmp / "results.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "integration" / "parallel_run.py"), shards,
                           str(tmp / "runs"), str(out), *[json.dumps(v) for v in VARIANTS]],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def max_weight_difference(a, b):
    return max((a[key][name] - b[key][name]).abs().max().item()
               for key in ("encoder", "target_encoder") for name in a[key])


def test_fsdp_trains_exactly_like_ddp(results):
    assert results["fsdp"]["losses"] == pytest.approx(results["ddp"]["losses"], rel=1e-6, abs=0)
    assert max_weight_difference(results["fsdp"], results["ddp"]) < 1e-6
    # The step did train: weights and the EMA target moved, and the losses differ from step to step.
    assert len(set(results["ddp"]["losses"])) == 3


def test_fsdp_accumulating_two_micro_batches_equals_ddp_at_twice_the_batch(results):
    for name in ("fsdp_accum2", "fsdp_accum2_ac"):
        assert results[name]["losses"] == pytest.approx(results["ddp"]["losses"], rel=1e-5, abs=0), name
        assert max_weight_difference(results[name], results["ddp"]) < 1e-5, name


def test_activation_checkpointing_changes_no_loss(results):
    assert results["ddp_ac"]["losses"] == pytest.approx(results["ddp"]["losses"], rel=1e-6, abs=0)
    assert max_weight_difference(results["ddp_ac"], results["ddp"]) < 1e-6


def test_fsdp_bfloat16_mixed_precision_stays_close_to_float32(results):
    bf16, fp32 = results["fsdp_bf16"]["losses"], results["ddp"]["losses"]
    assert bf16 != fp32  # the policy really computed in bfloat16
    assert bf16 == pytest.approx(fp32, rel=0.05)
    # Master weights stay float32 under the policy.
    assert all(t.dtype == torch.float32 for t in results["fsdp_bf16"]["encoder"].values())


def test_float32_targets_beside_a_bfloat16_step(results):
    """distributed.target_dtype=float32: the first loss has float32 targets (a different value from all-bfloat16),
    and FSDP computes the same as DDP."""
    plain, tgt32, fsdp_tgt32 = (results[n]["losses"] for n in ("ddp_bf16", "ddp_bf16_tgt32", "fsdp_bf16_tgt32"))
    assert tgt32[0] != plain[0]
    assert tgt32 == pytest.approx(plain, rel=0.05)
    assert fsdp_tgt32 == pytest.approx(tgt32, rel=0.01)
