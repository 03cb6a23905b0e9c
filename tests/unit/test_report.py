"""`ijepa-scale report`: numbers from per-rank CSVs (ours, official, still being written) and the PNG."""

from __future__ import annotations

import numpy as np
import pytest

from ijepa_scale.metrics import COLUMNS, CSVMetrics
from ijepa_scale.commands.report import main
from ijepa_scale.run_report import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, step_ms=(100.0, 100.0, 130.0), steps=12, batch=4):
    world = len(step_ms)
    for rank, ms in enumerate(step_ms):
        metrics = CSVMetrics(folder / f"jepa_r{rank}.csv", resume_step=None)
        for step in range(1, steps + 1):
            data_ms = 25.0
            metrics.log(**{**{c: 0 for c in COLUMNS}, **{
                "epoch": 1 + (step - 1) // 6, "itr": (step - 1) % 6, "loss": 1.0 / step, "mask-A": 10 + step % 3,
                "mask-B": 3, "time (ms)": ms - data_ms, "step": step, "lr": 1e-3 * step, "wd": 0.04,
                "momentum": 0.996, "grad_norm": 1.0, "data_ms": data_ms,
                "img_per_s": world * batch / (ms / 1000.0), "skipped": 2 * rank, "skipped_steps": 1 if rank else 0,
                "max_mem_mb": 100.0}})
        metrics.close()


def test_summary_of_a_finished_run(tmp_path, capsys):
    write_run(tmp_path)
    text, png, summary = report(tmp_path)
    ranks = summary["ranks"]
    assert [r["steps"] for r in ranks.values()] == [12, 12, 12] and ranks[0]["epochs"] == 2
    assert ranks[0]["img_per_s"] == pytest.approx(40.0) and ranks[2]["img_per_s"] == pytest.approx(4 / 0.13)
    assert summary["img_per_s_total"] == pytest.approx(40 + 40 + 4 / 0.13)
    assert ranks[1]["data_wait_share"] == pytest.approx(0.25)
    assert (ranks[2]["skipped_samples"], ranks[2]["skipped_steps"]) == (4, 1)
    assert summary["stragglers"] == [2]  # 130 ms vs a median of 100 ms
    assert summary["loss_start"] == pytest.approx(1.0) and summary["loss_end"] == pytest.approx(1 / 12)
    assert "<- straggler" in text.splitlines()[4]
    assert png == tmp_path / "report.png" and png.read_bytes()[:8] == PNG_MAGIC
    assert main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 0
    assert "stragglers" in capsys.readouterr().out and (tmp_path / "x.png").stat().st_size > 10_000


def test_a_run_still_writing_drops_the_half_line(tmp_path):
    write_run(tmp_path, step_ms=(100.0, 100.0))
    with open(tmp_path / "jepa_r0.csv", "a") as f:
        f.write("2,6,0.07,11,3,75.0,13,0.0")  # no newline yet: the writer is mid-row
    _, png, summary = report(tmp_path)
    assert summary["ranks"][0]["steps"] == 12 and summary["ranks"][0]["last_step"] == 12
    assert png.is_file()


def test_official_csv_format(tmp_path):
    rows = ["epoch,itr,loss,mask-A,mask-B,time (ms)"]
    for epoch in (1, 2):
        for itr in range(5):
            rows.append(f"{epoch},{itr},{0.5 / (epoch + itr):.4f},{100 + itr},{40},{900.0 + 10 * itr}")
    (tmp_path / "IN1K-vit.h.14-logs-rank.0.csv").write_text("\n".join(rows) + "\n")
    text, png, summary = report(tmp_path)
    assert summary["official_format"] and summary["ranks"][0]["steps"] == 10 and summary["ranks"][0]["epochs"] == 2
    assert summary["ranks"][0]["last_step"] == 10 and np.isnan(summary["img_per_s_total"])
    assert summary["median_step_ms"] == pytest.approx(920.0)
    assert "official CSV format" in text and png.read_bytes()[:8] == PNG_MAGIC


def test_folder_without_csv_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no per-rank CSV" in capsys.readouterr().err
