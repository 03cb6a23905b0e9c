"""A 2-rank main.py run that starts from weights served by a loopback HTTP server (meta.init_from)."""

from __future__ import annotations

import io
import os

import torch

from ijepa_scale.models import build_encoder, build_predictor
from tests.helpers.http_server import FileServer
from tests.integration.common import make_shards, read_csv, run_main, tiny_config, write_config


def test_two_rank_run_starts_from_downloaded_weights(tmp_path, monkeypatch):
    torch.manual_seed(11)
    encoder = build_encoder("vit_tiny", 32, 8, embed_dim=48, depth=2, num_heads=3)
    predictor = build_predictor(encoder, pred_depth=1, pred_emb_dim=24)
    released = {"encoder": {f"module.{k}": v for k, v in encoder.state_dict().items()},
                "target_encoder": {f"module.{k}": v for k, v in encoder.state_dict().items()},
                "predictor": {f"module.{k}": v for k, v in predictor.state_dict().items()},
                "epoch": 300, "opt": None, "scaler": None}
    buf = io.BytesIO()
    torch.save(released, buf)
    monkeypatch.setenv("IJEPA_SCALE_CACHE", str(tmp_path / "cache"))
    with FileServer() as server:
        server.files["/ijepa/released.pth.tar"] = buf.getvalue()
        url = server.url("/ijepa/released.pth.tar")
        # lr 0 everywhere: the weights at the end must be exactly the downloaded ones.
        config = tiny_config(make_shards(tmp_path / "shards"), tmp_path / "run",
                             optimization__lr=0.0, optimization__start_lr=0.0, optimization__final_lr=0.0)
        config["optimization"]["epochs"] = 1
        config["meta"]["init_from"] = url
        proc = run_main(write_config(tmp_path / "c.yaml", config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised encoder, predictor, target_encoder from " + url in proc.stdout
    assert [r for r in server.requests if r[0] == "/ijepa/released.pth.tar"] == [("/ijepa/released.pth.tar", None)]
    csv = read_csv(tmp_path / "run", 0)
    assert csv["step"].tolist() == list(range(1, 6)) and csv["epoch"].tolist() == [1] * 5
    saved = torch.load(tmp_path / "run" / "jepa-latest.pth.tar", weights_only=True)
    assert saved["step"] == 5 and saved["lineage"][0] == {"init_from": url}
    for net in ("encoder", "target_encoder", "predictor"):
        for name, value in released[net].items():
            # The EMA m*x + (1-m)*x of equal weights rounds in the last bit.
            torch.testing.assert_close(saved[net][name], value, rtol=1e-6, atol=1e-7, msg=f"{net} {name}")
            if net != "target_encoder":
                assert torch.equal(saved[net][name], value), (net, name)
    assert len([n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock")]) == 2  # file + pinned sha256
    # The run's report: both ranks, every step, a PNG.
    from ijepa_scale.run_report import report

    _, png, summary = report(tmp_path / "run")
    assert [r["steps"] for r in summary["ranks"].values()] == [5, 5] and summary["world_size"] == 2
    assert summary["img_per_s_total"] > 0 and png.read_bytes()[:4] == b"\x89PNG"
    # What a user sees: the ETA on progress lines, an end-of-run summary, rank 0's log kept as a file.
    assert "ETA epoch " in proc.stdout and " run " in proc.stdout.split("ETA epoch ", 1)[1]
    summary_line = next(line for line in proc.stdout.splitlines() if "run finished:" in line)
    assert "5 steps in this session" in summary_line and "jepa-latest.pth.tar" in summary_line
    log = (tmp_path / "run" / "jepa_r0.log").read_text()
    assert "initialised encoder" in log and "run finished:" in log and "[rank 1]" not in log


def test_fsdp_run_starts_from_a_local_checkpoint(tmp_path):
    """meta.init_from under distributed.parallel=fsdp: every rank keeps its shards of the full weights."""
    from ijepa_scale.checkpoint.dcp import consolidate

    torch.manual_seed(12)
    encoder = build_encoder("vit_tiny", 32, 8, embed_dim=48, depth=2, num_heads=3)
    predictor = build_predictor(encoder, pred_depth=1, pred_emb_dim=24)
    source = {"encoder": {f"module.{k}": v for k, v in encoder.state_dict().items()},
              "target_encoder": {f"module.{k}": v for k, v in encoder.state_dict().items()},
              "predictor": {f"module.{k}": v for k, v in predictor.state_dict().items()}}
    torch.save(source, tmp_path / "source.pth.tar")
    config = tiny_config(make_shards(tmp_path / "shards"), tmp_path / "run",
                         optimization__lr=0.0, optimization__start_lr=0.0, optimization__final_lr=0.0)
    config["optimization"]["epochs"] = 1
    config["meta"]["init_from"] = str(tmp_path / "source.pth.tar")
    config["distributed"] = {"parallel": "fsdp"}
    proc = run_main(write_config(tmp_path / "c.yaml", config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised encoder, predictor, target_encoder from" in proc.stdout
    saved = consolidate(tmp_path / "run" / "jepa-latest.dcp")
    for net in ("encoder", "predictor"):
        for name, value in source[net].items():
            assert torch.equal(saved[net][name], value), (net, name)
