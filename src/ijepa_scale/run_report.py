"""`ijepa-scale report LOGDIR`: a summary of a run's per-rank CSVs and a PNG of its curves.

Reads ``{tag}_r{rank}.csv`` (ours, or the official code's six columns ``epoch,itr,loss,mask-A,
mask-B,time (ms)``) and the released logs' ``...-logs-rank.{rank}.csv``. A run that is still
writing is fine: a half-written last line is dropped.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .errors import UserError

RANK_FILE = re.compile(r"^(?P<tag>.*?)(?:_r|[-_.]rank\.?)(?P<rank>\d+)\.csv$")
OFFICIAL_COLUMNS = ["epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)"]
STRAGGLER_FACTOR = 1.10


def find_rank_files(source: Path) -> dict[int, Path]:
    if source.is_file():
        match = RANK_FILE.match(source.name)
        return {int(match.group("rank")) if match else 0: source}
    if not source.is_dir():
        raise UserError(f"{source}: no such folder or file; pass the run's logging.folder")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(source.glob("*.csv")):
        match = RANK_FILE.match(path.name)
        if match and ".previous-" not in path.name:
            found.setdefault(match.group("tag"), {})[int(match.group("rank"))] = path
    if not found:
        raise UserError(f"{source} holds no per-rank CSV ({{tag}}_r{{rank}}.csv); pass the run's logging.folder")
    if len(found) > 1:
        # Several runs (write_tags) in one folder: the one with the most recent file.
        newest = max(found, key=lambda tag: max(p.stat().st_mtime for p in found[tag].values()))
        print(f"note: {source} holds runs {sorted(found)}; reporting on {newest!r}", file=sys.stderr)
        return found[newest]
    return next(iter(found.values()))


def read_rank_csv(path: Path) -> pd.DataFrame:
    """One rank's rows; a line still being written (no newline yet) is dropped."""
    text = path.read_text(errors="replace")
    text = text[: text.rfind("\n") + 1]
    if not text:
        raise UserError(f"{path}: empty (the run has not written its header yet)")
    frame = pd.read_csv(io.StringIO(text), on_bad_lines="skip", engine="python")
    missing = [c for c in OFFICIAL_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: not an I-JEPA metrics CSV (missing columns {missing})")
    for column in frame.columns:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame = frame.dropna(subset=["epoch", "itr", "time (ms)"]).reset_index(drop=True)
    if "step" not in frame.columns or frame["step"].isna().all():
        frame["step"] = np.arange(1, len(frame) + 1)  # the official log has no global step
    return frame


def _step_ms(frame: pd.DataFrame) -> pd.Series:
    if "data_ms" in frame.columns and frame["data_ms"].notna().any():
        return frame["time (ms)"] + frame["data_ms"].fillna(0.0)
    return frame["time (ms)"]


def summarize(frames: dict[int, pd.DataFrame]) -> dict:
    """Numbers for the report (also what tests check)."""
    ranks = {}
    world = len(frames)
    for rank, frame in sorted(frames.items()):
        step_ms = _step_ms(frame)
        steady = step_ms.iloc[1:] if len(step_ms) > 1 else step_ms  # the first step includes start-up
        info = {
            "steps": int(len(frame)),
            "last_step": int(frame["step"].iloc[-1]) if len(frame) else 0,
            "epochs": int(frame["epoch"].max()) if len(frame) else 0,
            "median_step_ms": float(steady.median()) if len(steady) else float("nan"),
            "data_wait_share": float("nan"),
            "img_per_s": float("nan"),
            "skipped_samples": 0,
            "skipped_steps": 0,
        }
        if "data_ms" in frame.columns and frame["data_ms"].notna().any():
            info["data_wait_share"] = float(frame["data_ms"].iloc[1:].sum() / max(step_ms.iloc[1:].sum(), 1e-9)) \
                if len(frame) > 1 else float("nan")
        if "img_per_s" in frame.columns and frame["img_per_s"].notna().any():
            # img_per_s is the global rate as each rank saw it; this rank's share is 1/world of it.
            # Images over time (not a median of rates), without the first step's start-up.
            rows = frame.iloc[1:] if len(frame) > 1 else frame
            seconds = step_ms.loc[rows.index] / 1000.0
            images = (rows["img_per_s"] * seconds).sum() / world
            info["img_per_s"] = float(images / max(seconds.sum(), 1e-9))
        for column, key in (("skipped", "skipped_samples"), ("skipped_steps", "skipped_steps")):
            if column in frame.columns and frame[column].notna().any():
                info[key] = int(frame[column].dropna().iloc[-1])
        ranks[rank] = info
    medians = [r["median_step_ms"] for r in ranks.values() if np.isfinite(r["median_step_ms"])]
    overall = float(np.median(medians)) if medians else float("nan")
    stragglers = [rank for rank, r in ranks.items()
                  if np.isfinite(r["median_step_ms"]) and r["median_step_ms"] > STRAGGLER_FACTOR * overall]
    main = frames[min(frames)]
    losses = main["loss"].dropna()
    losses = losses[np.isfinite(losses)]
    window = max(1, min(10, len(losses) // 10 or 1))
    rates = [r["img_per_s"] for r in ranks.values() if np.isfinite(r["img_per_s"])]
    return {
        "ranks": ranks,
        "world_size": world,
        "median_step_ms": overall,
        "stragglers": stragglers,
        "img_per_s_total": float(sum(rates)) if rates else float("nan"),
        "loss_start": float(losses.iloc[:window].mean()) if len(losses) else float("nan"),
        "loss_end": float(losses.iloc[-window:].mean()) if len(losses) else float("nan"),
        "loss_window": window,
        "official_format": "lr" not in main.columns,
    }


def format_summary(summary: dict, source: Path) -> str:
    def num(value, fmt):
        return "-" if value is None or not np.isfinite(value) else format(value, fmt)

    lines = [f"run: {source} ({summary['world_size']} rank(s)"
             + (", official CSV format" if summary["official_format"] else "") + ")"]
    header = f"{'rank':>4} {'steps':>7} {'last step':>9} {'epochs':>6} {'ms/step':>8} {'img/s':>8} " \
             f"{'data wait':>9} {'skipped':>7} {'skipped steps':>13}"
    lines.append(header)
    for rank, r in summary["ranks"].items():
        flag = "  <- straggler" if rank in summary["stragglers"] else ""
        share = "-" if not np.isfinite(r["data_wait_share"]) else f"{100 * r['data_wait_share']:.1f}%"
        lines.append(f"{rank:>4} {r['steps']:>7} {r['last_step']:>9} {r['epochs']:>6} "
                     f"{num(r['median_step_ms'], '.1f'):>8} {num(r['img_per_s'], '.1f'):>8} {share:>9} "
                     f"{r['skipped_samples']:>7} {r['skipped_steps']:>13}{flag}")
    lines.append(f"total: {num(summary['img_per_s_total'], '.1f')} img/s; median step "
                 f"{num(summary['median_step_ms'], '.1f')} ms")
    lines.append(f"loss (rank 0, mean of {summary['loss_window']} steps): start {num(summary['loss_start'], '.4f')} "
                 f"-> end {num(summary['loss_end'], '.4f')}")
    if summary["stragglers"]:
        lines.append(f"stragglers (median step > {STRAGGLER_FACTOR:.2f} x the median of all ranks): "
                     f"ranks {summary['stragglers']}")
    else:
        lines.append("stragglers: none (no rank's median step is >10% slower than the median)")
    return "\n".join(lines)


def plot(frames: dict[int, pd.DataFrame], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = frames[min(frames)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    ax.plot(main["step"], main["loss"], lw=0.8, alpha=0.5, label="loss (rank 0)")
    if len(main) >= 20:
        ax.plot(main["step"], main["loss"].rolling(max(5, len(main) // 50), min_periods=1).mean(), lw=1.5,
                label="moving average")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    if "lr" in main.columns and main["lr"].notna().any():
        ax.plot(main["step"], main["lr"], label="lr")
        ax.set_title("learning rate")
        if "wd" in main.columns and main["wd"].notna().any():
            twin = ax.twinx()
            twin.plot(main["step"], main["wd"], color="tab:orange", lw=0.8, label="weight decay")
            twin.set_ylabel("weight decay", color="tab:orange")
    else:
        ax.text(0.5, 0.5, "not logged (official CSV format)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("learning rate")
    ax = axes[1][0]
    world = len(frames)
    for rank, frame in sorted(frames.items()):
        if "img_per_s" in frame.columns and frame["img_per_s"].notna().any():
            ax.plot(frame["step"], frame["img_per_s"] / world, lw=0.8, label=f"rank {rank}")
            ax.set_ylabel("images/s per rank")
        else:
            ax.plot(frame["step"], frame["time (ms)"], lw=0.8, label=f"rank {rank}")
            ax.set_ylabel("ms per step")
    ax.set_title("throughput")
    if world <= 8:
        ax.legend(fontsize=8)
    ax = axes[1][1]
    ax.plot(main["step"], main["mask-A"], lw=0.8, label="context (mask-A)")
    ax.plot(main["step"], main["mask-B"], lw=0.8, label="target (mask-B)")
    ax.set_title("mask sizes (patches kept per block)")
    ax.legend(fontsize=8)
    for row in axes:
        for a in row:
            a.set_xlabel("step")
            a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def report(source: str | Path, out: Optional[str | Path] = None) -> tuple[str, Path, dict]:
    source = Path(source)
    files = find_rank_files(source)
    frames = {rank: read_rank_csv(path) for rank, path in files.items()}
    frames = {rank: f for rank, f in frames.items() if len(f)}
    if not frames:
        raise UserError(f"{source}: the CSVs have no complete row yet; run the report again after the first step")
    summary = summarize(frames)
    folder = source if source.is_dir() else source.parent
    png = Path(out) if out else folder / "report.png"
    plot(frames, png, f"{folder.name}: {summary['world_size']} rank(s), step {max(r['last_step'] for r in summary['ranks'].values())}")
    return format_summary(summary, source), png, summary

