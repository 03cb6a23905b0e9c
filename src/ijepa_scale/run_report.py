"""`ijepa-scale report LOGDIR [LOGDIR ...]`: a summary of a run's per-rank CSVs and a PNG of its curves,
or, for several runs, one table and one PNG overlaying them and the config keys where they differ.

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


def plot(frames: dict[int, pd.DataFrame], out: Path, title: str, log_y: bool = False) -> Path:
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
    if log_y:
        ax.set_yscale("log")
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
    return _save_figure(fig, axes, title, out)


def _save_figure(fig, axes, title: str, out: Path, integer_steps: bool = False) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for row in axes:
        for a in row:
            a.set_xlabel("step")
            if integer_steps:
                a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def read_run(source: Path) -> dict[int, pd.DataFrame]:
    files = find_rank_files(source)
    frames = {rank: read_rank_csv(path) for rank, path in files.items()}
    frames = {rank: f for rank, f in frames.items() if len(f)}
    if not frames:
        raise UserError(f"{source}: the CSVs have no complete row yet; run the report again after the first step")
    return frames


def report(source: str | Path, out: Optional[str | Path] = None, log_y: bool = False) -> tuple[str, Path, dict]:
    source = Path(source)
    frames = read_run(source)
    summary = summarize(frames)
    folder = source if source.is_dir() else source.parent
    png = Path(out) if out else folder / "report.png"
    last_step = max(r["last_step"] for r in summary["ranks"].values())
    plot(frames, png, f"{folder.name}: {summary['world_size']} rank(s), step {last_step}", log_y=log_y)
    return format_summary(summary, source), png, summary


# ------------------------------------------------------------------------------------------ several runs
def has_rank_csv(folder: Path) -> bool:
    return any(RANK_FILE.match(p.name) and ".previous-" not in p.name for p in folder.glob("*.csv"))


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def expand_runs(sources: list[str | Path]) -> tuple[list[Path], list[str]]:
    """The run folders (or CSV files) to compare, and notes for the user: a folder without CSVs whose
    subfolders hold runs (a sweep) stands for those runs; a run given twice counts once."""
    runs: list[Path] = []
    notes: list[str] = []
    for source in map(Path, sources):
        if source.is_dir() and not has_rank_csv(source):
            children = sorted((c for c in source.iterdir() if c.is_dir()), key=_natural)
            found = [c for c in children if has_rank_csv(c)]
            if found:
                notes.append(f"{source} holds {len(found)} runs ({', '.join(c.name for c in found)}); comparing them")
                waiting = [c.name for c in children if c not in found and not c.name.startswith(".")]
                if waiting:
                    notes.append(f"{source}: {', '.join(waiting)} hold(s) no per-rank CSV yet; left out")
                runs += found
                continue
        runs.append(source)
    unique: list[Path] = []
    for run in runs:
        if run.exists() and any(run.resolve() == u.resolve() for u in unique if u.exists()):
            notes.append(f"{run} is given twice; compared once")
            continue
        unique.append(run)
    return unique, notes


def distinct_labels(paths: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell it from the others."""
    parts = [Path(p).resolve().parts for p in paths]
    depths = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depths)]
        clashes = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depths[i] < len(parts[i])]
        if not clashes:
            return labels
        for i in clashes:
            depths[i] += 1


def _last(frame: pd.DataFrame, column: str) -> float:
    if column in frame.columns and frame[column].notna().any():
        return float(frame[column].dropna().iloc[-1])
    return float("nan")


def _run_folder(source: Path) -> Path:
    return source if source.is_dir() else source.parent


def _configs(runs: list[Path]) -> tuple[list, list[str]]:
    """Each run's RunConfig (None when it has none that can be read) and a note per missing one."""
    from .config_diff import read_config

    configs, notes = [], []
    for run in runs:
        try:
            configs.append(read_config(_run_folder(run)))
        except UserError as exc:
            configs.append(None)
            notes.append(f"config of {run} not compared: {exc}")
    return configs, notes


def compare(sources: list[str | Path], out: Optional[str | Path] = None, log_y: bool = False
            ) -> tuple[str, Path, dict]:
    """(text, PNG path, numbers) of several runs: one row and one colour per run, and the config keys that
    differ between them. The runs may have different lengths, ranks and CSV formats."""
    from .config_diff import IGNORED_KEYS, also_differ, differing_keys, format_table, show

    runs, notes = expand_runs(sources)
    if not runs:
        raise UserError("no run to report on; pass run folders (logging.folder)")
    if len(runs) == 1:
        text, png, summary = report(runs[0], out, log_y=log_y)
        return "\n".join([*(f"note: {n}" for n in notes), text]), png, {"runs": {str(runs[0]): summary}}
    frames = {run: read_run(run) for run in runs}
    labels = distinct_labels([_run_folder(r) if r.is_file() else r for r in runs])
    configs, config_notes = _configs(runs)
    known = [c for c in configs if c is not None]
    differ, left_out = differing_keys(known) if len(known) > 1 else ({}, [])
    summaries = {run: summarize(f) for run, f in frames.items()}

    def num(value, fmt):
        return "-" if value is None or not np.isfinite(value) else format(value, fmt)

    lines = [f"note: {n}" for n in notes + config_notes]
    lines.append(f"{len(runs)} runs:")
    lines += [f"  {label}: {run}" for label, run in zip(labels, runs)]
    header = ["run", "ranks", "steps", "last step", "epochs", "ms/step", "img/s", "loss start", "loss end",
              "k-NN", "eff_rank", "stragglers"]
    rows = []
    for label, run in zip(labels, runs):
        s, main = summaries[run], frames[run][min(frames[run])]
        rank0 = s["ranks"][min(s["ranks"])]
        rows.append([label, str(s["world_size"]), str(rank0["steps"]), str(rank0["last_step"]), str(rank0["epochs"]),
                     num(s["median_step_ms"], ".1f"), num(s["img_per_s_total"], ".1f"), num(s["loss_start"], ".4f"),
                     num(s["loss_end"], ".4f"), num(_last(main, "knn_acc"), ".3f"), num(_last(main, "eff_rank"), ".2f"),
                     ",".join(map(str, s["stragglers"])) or "-"])
    lines += format_table(header, rows, indent="")
    lines.append("(steps, loss and k-NN of rank 0; loss start/end: mean of up to 10 steps; k-NN and eff_rank: last "
                 "logged)")
    known_labels = [label for label, c in zip(labels, configs) if c is not None]
    if len(known) < 2:
        lines.append("config keys that differ: not compared (fewer than two runs have a params yaml)")
    elif differ:
        lines.append(f"config keys that differ ({len(differ)}):")
        lines += format_table(["key", *known_labels], [[key, *map(show, values)] for key, values in differ.items()])
    else:
        lines.append("config keys that differ: none")
    if left_out:
        lines.append(f"({also_differ(left_out)}, as for any two runs; not listed)")
    legend = _legend_labels(labels, configs, differ)
    parents = {Path(r).resolve().parent for r in runs}
    common = parents.pop() if len(parents) == 1 else None
    png = Path(out) if out else (common or Path.cwd()) / "compare.png"
    plot_runs([frames[r] for r in runs], legend, png, f"{len(runs)} runs" + (f" in {common}" if common else ""),
              log_y=log_y)
    result = {"runs": {str(r): summaries[r] for r in runs}, "labels": labels, "legend": legend,
              "differ": differ, "left_out": left_out, "ignored": IGNORED_KEYS}
    return "\n".join(lines), png, result


def _legend_labels(labels: list[str], configs: list, differ: dict[str, list]) -> list[str]:
    """The run labels, followed by the differing settings when there are at most three."""
    from .config_diff import show

    if not differ or len(differ) > 3:
        return list(labels)
    out = []
    for i, (label, config) in enumerate(zip(labels, configs)):
        if config is None:
            out.append(label)
            continue
        index = sum(c is not None for c in configs[:i])
        settings = ", ".join(f"{key.rsplit('.', 1)[-1]}={show(values[index])}" for key, values in differ.items())
        out.append(f"{label} ({settings})")
    return out


def plot_runs(runs: list[dict[int, pd.DataFrame]], labels: list[str], out: Path, title: str,
              log_y: bool = False) -> Path:
    """Runs overlaid, one colour each: loss, lr, throughput per rank, k-NN accuracy and two collapse metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    mains = [frames[min(frames)] for frames in runs]
    ax = axes[0][0]
    for i, (main, label) in enumerate(zip(mains, labels)):
        colour = colours(i % colours.N)
        if len(main) >= 20:
            ax.plot(main["step"], main["loss"], lw=0.6, alpha=0.3, color=colour)
            ax.plot(main["step"], main["loss"].rolling(max(5, len(main) // 50), min_periods=1).mean(), lw=1.5,
                    color=colour, label=label)
        else:
            ax.plot(main["step"], main["loss"], lw=1.2, color=colour, label=label, marker=".")
    ax.set_title("loss (rank 0" + (", moving average over the raw curve" if max(map(len, mains)) >= 20 else "")
                 + (", log axis)" if log_y else ")"))
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=7 if len(runs) > 5 else 8)

    def overlay(ax, column, title, marker=None):
        drawn = False
        for i, main in enumerate(mains):
            if column in main.columns and main[column].notna().any():
                rows = main.dropna(subset=[column])
                ax.plot(rows["step"], rows[column], lw=1.0, color=colours(i % colours.N), marker=marker)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)

    overlay(axes[0][1], "lr", "learning rate")
    ax = axes[0][2]
    per_rank = all("img_per_s" in f[min(f)].columns and f[min(f)]["img_per_s"].notna().any() for f in runs)
    for i, frames in enumerate(runs):
        for rank, frame in sorted(frames.items()):
            y = frame["img_per_s"] / len(frames) if per_rank else _step_ms(frame)
            ax.plot(frame["step"], y, lw=0.7, alpha=0.8, color=colours(i % colours.N))
    ax.set_ylabel("images/s per rank" if per_rank else "ms per step")
    ax.set_title("throughput, every rank" + ("" if per_rank else " (some runs log no images/s)"))
    overlay(axes[1][0], "knn_acc", "k-NN accuracy (periodic evaluation)", marker="o")
    overlay(axes[1][1], "eff_rank", "effective rank of the target features")
    overlay(axes[1][2], "target_std", "target feature std")
    return _save_figure(fig, axes, title, out, integer_steps=True)

