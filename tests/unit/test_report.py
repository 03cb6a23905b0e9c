"""`ijepa-scale report`: numbers from per-rank CSVs (ours, official, still being written) and the PNG."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ijepa_scale.metrics import COLUMNS, CSVMetrics
from ijepa_scale.commands.report import main
from ijepa_scale.run_report import compare, report
from tests.helpers.runs import train_tiny_run

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


# ------------------------------------------------------------------------------------------ several runs
@pytest.fixture(scope="module")
def sweep(shards, tmp_path_factory):
    """A sweep-like folder of two real runs of different lengths and learning rates, one with k-NN
    evaluations, and a task that has not started yet."""
    folder = tmp_path_factory.mktemp("sweep")
    train_tiny_run(shards, folder / "lr1e-3", epochs=3)
    train_tiny_run(shards, folder / "lr4e-3", epochs=2, knn=True, lr=0.004)
    (folder / "lr8e-3").mkdir()
    return folder


def test_several_runs_one_table_one_png_and_the_differing_keys(sweep, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main([str(sweep / "lr1e-3"), str(sweep / "lr4e-3"), "--log-y", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("lr")}
    assert rows["lr1e-3"][1:5] == ["1", "18", "18", "3"] and rows["lr4e-3"][1:5] == ["1", "12", "12", "2"]
    assert rows["lr1e-3"][9] == "-" and 0.0 <= float(rows["lr4e-3"][9]) <= 1.0  # k-NN only where evaluated
    start = lines.index("config keys that differ (5):")  # evaluation.every_steps and its shards, then:
    assert lines[start + 5].split() == ["optimization.epochs", "3", "2"]
    assert lines[start + 6].split() == ["optimization.lr", "0.001", "0.004"]
    assert "(logging.folder differs too, as for any two runs; not listed)" in lines
    assert lines[-1] == f"wrote {out}" and out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 50_000


def test_the_legend_names_up_to_three_differing_settings(sweep, tmp_path):
    copy = shutil.copytree(sweep / "lr1e-3", tmp_path / "lr2e-3")
    params = copy / "params-ijepa.yaml"
    params.write_text(params.read_text().replace("lr: 0.001", "lr: 0.002"))
    _, _, result = compare([sweep / "lr1e-3", copy], tmp_path / "cmp.png")
    assert result["legend"] == ["lr1e-3 (lr=0.001)", "lr2e-3 (lr=0.002)"]
    assert compare([sweep / "lr1e-3", sweep / "lr4e-3"], tmp_path / "cmp.png")[2]["legend"] == ["lr1e-3", "lr4e-3"]


def test_a_sweep_folder_stands_for_its_runs_and_a_run_given_twice_counts_once(sweep, capsys):
    assert main([str(sweep), str(sweep / "lr4e-3")]) == 0
    out = capsys.readouterr().out
    assert f"note: {sweep} holds 2 runs (lr1e-3, lr4e-3); comparing them" in out
    assert f"note: {sweep}: lr8e-3 hold(s) no per-rank CSV yet; left out" in out
    assert f"note: {sweep / 'lr4e-3'} is given twice; compared once" in out
    assert "2 runs:" in out and (sweep / "compare.png").read_bytes()[:8] == PNG_MAGIC


def test_one_run_reads_as_before(sweep):
    text, png, _ = report(sweep / "lr1e-3")
    assert compare([sweep / "lr1e-3"], log_y=True)[0] == text and text.startswith(f"run: {sweep / 'lr1e-3'} (1 ")


def test_a_folder_without_csv_among_runs_is_a_one_line_error(sweep, capsys):
    assert main([str(sweep / "lr1e-3"), str(sweep / "lr8e-3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {sweep / 'lr8e-3'} holds no per-rank CSV")


def test_runs_without_a_config_or_in_the_official_format_are_overlaid(sweep, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs in different folders: compare.png goes to the current one
    write_run(tmp_path / "a" / "run", step_ms=(100.0, 110.0))
    (tmp_path / "b" / "run").mkdir(parents=True)
    (tmp_path / "b" / "run" / "IN1K-logs-rank.0.csv").write_text(
        "epoch,itr,loss,mask-A,mask-B,time (ms)\n" + "".join(f"1,{i},{1 / (i + 1)},90,30,900\n" for i in range(5)))
    text, png, result = compare([sweep / "lr1e-3", tmp_path / "a" / "run", tmp_path / "b" / "run"])
    assert result["labels"] == ["lr1e-3", "a/run", "b/run"] and png == Path.cwd() / "compare.png"
    assert "config keys that differ: not compared (fewer than two runs have a params yaml)" in text
    assert f"note: config of {tmp_path / 'a' / 'run'} not compared" in text and png.read_bytes()[:8] == PNG_MAGIC
