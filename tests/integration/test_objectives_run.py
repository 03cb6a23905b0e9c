"""Every objective through main.py on 2 gloo ranks: it trains (finite, falling loss), and a run stopped
mid-epoch under FSDP and resumed equals an uninterrupted DDP run, step by step and weight by weight."""

import pytest
import torch

from ijepa_scale.checkpoint.dcp import consolidate
from tests.integration.common import SHARD_SIZES, read_csv, run_main, tiny_config, write_config

pytestmark = pytest.mark.integration

STEPS = 2 * (sum(SHARD_SIZES) // (2 * 4))
OBJECTIVES = {
    "pkt": {"meta": {"objective": "pkt"}},
    "gated": {"meta": {"objective": "gated"}, "gated": {"lambda_gates": 0.5, "gate_layer": 0, "gate_location": "attn"}},
    "saccade": {"meta": {"objective": "saccade"}, "saccade": {"crop_fraction": 0.75}},
    "saccade_convnext": {"meta": {"objective": "saccade"}, "data": {"crop_size": 48},
                         "saccade": {"backbone": "convnext_atto", "embed_dim": 32, "crop_fraction": 0.75}},
}
# The networks each objective checkpoints (trained ones, then the EMA teacher).
NETWORKS = {"pkt": ("encoder", "predictor", "target_encoder"), "gated": ("student", "predictor", "target_encoder"),
            "saccade": ("student", "predictor", "target_encoder")}


def config_for(name, shards, folder, **overrides):
    config = tiny_config(shards, folder)
    for section, values in OBJECTIVES[name].items():
        config.setdefault(section, {}).update(values)
    for key, value in overrides.items():
        section, field = key.split("__")
        config.setdefault(section, {})[field] = value
    return config


def networks_of(name):
    return NETWORKS[name.split("_")[0]]


def weights(path):
    return consolidate(path) if path.is_dir() else torch.load(path, weights_only=False, map_location="cpu")


@pytest.fixture(scope="module", params=list(OBJECTIVES))
def runs(request, shards, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    full = write_config(tmp / "full.yaml", config_for(name, shards, tmp / "full"))
    proc = run_main(full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fsdp = write_config(tmp / "fsdp.yaml", config_for(name, shards, tmp / "fsdp", distributed__parallel="fsdp"))
    stopped = run_main(fsdp, "optimization.stop_at_step=3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = run_main(fsdp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    return name, tmp, proc


def test_objective_trains_and_logs_its_metrics(runs):
    name, tmp, proc = runs
    frame = read_csv(tmp / "full", 0)
    losses = frame["loss"].astype(float)
    assert frame["step"].tolist() == list(range(1, STEPS + 1))
    assert losses.notna().all() and (losses.abs() < 1e4).all()
    assert losses.iloc[-3:].mean() < losses.iloc[:3].mean(), losses.tolist()
    assert read_csv(tmp / "full", 1)["loss"].tolist() == frame["loss"].tolist()
    extra = {"pkt": ("pred_loss", "pkt_loss"), "gated": ("pred_loss", "gate_penalty", "open_frac"),
             "saccade": ("pred_loss", "cycle_loss", "var_loss", "cov_loss")}[name.split("_")[0]]
    for column in ("pred_norm", "target_std", "eff_rank") + extra:
        assert frame[column].notna().all(), column
    if name == "gated":
        assert ((frame["open_frac"] > 0) & (frame["open_frac"] < 1)).all()
    masks = name.startswith("pkt")
    assert frame["mask-A"].notna().all() == masks and frame["mask-A"].isna().all() != masks
    state = torch.load(tmp / "full" / "jepa-latest.pth.tar", weights_only=False)
    assert state["config"]["meta"]["objective"] == name.split("_")[0]
    assert set(networks_of(name)) | {"opt"} <= set(state)


def test_fsdp_resumed_mid_epoch_equals_uninterrupted_ddp(runs):
    name, tmp, _ = runs
    for rank in (0, 1):
        full, resumed = read_csv(tmp / "full", rank), read_csv(tmp / "fsdp", rank)
        assert resumed["step"].tolist() == full["step"].tolist()
        assert resumed["loss"].astype(float).tolist() == pytest.approx(full["loss"].astype(float).tolist(),
                                                                       rel=1e-5, abs=1e-7)
    a = weights(tmp / "full" / "jepa-latest.pth.tar")
    b = weights((tmp / "fsdp" / "jepa-latest.dcp").resolve())
    assert b["step"] == STEPS
    for key in networks_of(name):
        assert a[key].keys() == b[key].keys(), key
        for tensor in a[key]:
            assert torch.allclose(a[key][tensor], b[key][tensor], rtol=1e-4, atol=1e-6), f"{key}.{tensor}"
