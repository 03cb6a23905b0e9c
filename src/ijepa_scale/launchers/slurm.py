"""SLURM launcher on submitit: submission (flags, presets, checks, dry run, batch, sweeps) and the job itself.

Submission checks everything it can before sbatch: the typed config (with overrides), the
flags and preset, and the partition (against `sinfo`). It writes the resolved config, the
command line and the git state next to submitit's files in `--folder/job_<id>/`.

In the job every task is one rank. A SLURM warning signal (USR2, `--signal-delay` seconds
before the time limit, or sent by `scancel --signal=USR2` on preemption) makes every rank
finish its step; the ranks agree on that step, a checkpoint of it is committed, and only then
rank 0 hands over to submitit's own USR2 handler, which asks `checkpoint()` for the next
submission and requeues the job. The requeued job resumes from the newest checkpoint in
`logging.folder`, found when it starts. Requeue bookkeeping is ours (submitit calls every
signal a time-out when --time <= 10 min): time-limit requeues count against --max-requeues,
preemptions do not, and a requeue at the same step as the previous one (no progress) stops
the job instead of looping. A hang or a lost rank (a task killed, a node or link gone) requeues the job the
same way (`after_hang`), counted against --max-requeues and never twice without a newer checkpoint. A failed
run (an error raised on some rank) is never requeued.

A sweep (`--sweep KEY=V1,V2 ...`) is one job array of such jobs, one per combination of values,
each in its own folder under `logging.folder`, listed in `logging.folder/sweep.json`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import Config, dump_config, load_config
from ..errors import RunFailure, UserError, one_line
from ..version import run_info
from ..fileutil import atomic_write

# Your own presets in ./launch/slurm (relative to the current folder), then those shipped with the package.
PRESET_DIRS = (Path("launch/slurm"), Path(__file__).resolve().parent / "presets")
# Our own bookkeeping decides about requeues; submitit's time-out countdown must never stop one.
SUBMITIT_MAX_NUM_TIMEOUT = 1_000_000
# SLURM may send the warning signal up to 60 s before --signal-delay (sbatch(1)); plus start-up.
EARLY_SIGNAL_SLACK_S = 90
WAIT_FOR_REQUEUE_S = 300
# How many tasks of a job array (--sweep, --batch-launch) run at once unless --array-parallelism says otherwise.
ARRAY_PARALLELISM = 256
# sbatch(1) --mail-type values.
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
# sbatch(1) --dependency: type:job_id[+minutes][:job_id...] joined by ',' (all of) or '?' (any of); or singleton.
_DEPENDENCY_ITEM = (r"(?:singleton|(?:after|afterany|afterburstbuffer|aftercorr|afternotok|afterok|expand)"
                    r"(?::\d+(?:_\d+)?(?:\+\d+)?)+)")
DEPENDENCY = re.compile(rf"{_DEPENDENCY_ITEM}(?:,{_DEPENDENCY_ITEM})*|{_DEPENDENCY_ITEM}(?:\?{_DEPENDENCY_ITEM})+")


# ------------------------------------------------------------------ options


@dataclass
class SlurmOptions:
    """Resources and requeue policy of a submission: flags over preset over these defaults."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    exclude: Optional[str] = None
    constraint: Optional[str] = None
    nodelist: Optional[str] = None
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 10
    gpus_per_node: Optional[int] = None  # None: one GPU per task (as official)
    mem_per_gpu: Optional[str] = None
    mem: Optional[str] = None
    time: int = 4300
    signal_delay: int = 120
    max_requeues: int = 20
    job_name: Optional[str] = None
    array_parallelism: int = ARRAY_PARALLELISM
    mail_type: Optional[str] = None
    mail_user: Optional[str] = None
    dependency: Optional[str] = None

    def validate(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time", "array_parallelism"):
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} {getattr(self, name)}: must be at least 1")
        for name in ("gpus_per_node", "signal_delay", "max_requeues"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} {getattr(self, name)}: must be 0 or more")
        if self.gpus_per_node and self.gpus_per_node != self.tasks_per_node:
            raise UserError(f"--gpus-per-node {self.gpus_per_node} with --tasks-per-node {self.tasks_per_node}: "
                            "one task per GPU, so make them equal (or --gpus-per-node 0 for a CPU job)")
        if self.signal_delay >= self.time * 60:
            raise UserError(f"--signal-delay {self.signal_delay} s leaves no time to train within --time "
                            f"{self.time} min: lower it or raise --time")
        if self.mem and self.mem_per_gpu:
            raise UserError(f"--mem {self.mem} and --mem-per-gpu {self.mem_per_gpu}: give only one")
        if self.mem_per_gpu and not self.gpus_per_node:
            raise UserError(f"--mem-per-gpu {self.mem_per_gpu} in a CPU job (--gpus-per-node 0): use --mem")
        for name in ("mem", "mem_per_gpu"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"\d+[KMGT]?", value):
                raise UserError(f"--{_flag(name)} {value!r}: use SLURM's form, e.g. 55G or 4000M")
        if self.mail_type is not None:
            unknown = [t for t in self.mail_type.split(",") if t.upper() not in MAIL_TYPES]
            if unknown:
                raise UserError(f"--mail-type {self.mail_type!r}: {unknown[0]!r} is not a SLURM mail type "
                                f"(one or more of {','.join(MAIL_TYPES)}, comma-separated)")
        if self.mail_user is not None and not re.fullmatch(r"[^\s,]+", self.mail_user):
            raise UserError(f"--mail-user {self.mail_user!r}: give one address or user name")
        if self.mail_user is not None and self.mail_type is None:
            raise UserError(f"--mail-user {self.mail_user} without --mail-type sends no mail: add e.g. "
                            "--mail-type END,FAIL")
        if self.dependency is not None and not DEPENDENCY.fullmatch(self.dependency):
            raise UserError(f"--dependency {self.dependency!r}: use SLURM's form TYPE:JOBID[:JOBID...] joined by ',' "
                            "(all) or '?' (any), e.g. afterok:1234 or afterany:1234_0,afterok:1240; or singleton")


def _flag(name: str) -> str:
    return name.replace("_", "-")


OPTION_TYPES = {f.name: (int if f.type in ("int", "Optional[int]") else str) for f in dataclasses.fields(SlurmOptions)}


def preset_path(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--preset {name}: file not found")
        return path
    for folder in PRESET_DIRS:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted({p.stem for folder in PRESET_DIRS if folder.is_dir() for p in folder.glob("*.yaml")})
    raise UserError(f"--preset {name}: unknown preset (known: {', '.join(known) or 'none'}; "
                    f"a preset is launch/slurm/NAME.yaml here, or a path)")


def load_preset(name: str) -> dict[str, Any]:
    path = preset_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"preset {path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"preset {path}: must be a mapping of option: value")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in OPTION_TYPES:
            close = difflib.get_close_matches(name, list(OPTION_TYPES), n=1, cutoff=0.0)
            raise UserError(f"preset {path}: unknown key {key!r} (did you mean {close[0]!r}?)")
        if value is None:
            continue
        if OPTION_TYPES[name] is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"preset {path}: {key} must be an integer, got {value!r}")
        values[name] = value if OPTION_TYPES[name] is int else str(value)
    return values


def resolve_options(args: argparse.Namespace) -> SlurmOptions:
    preset = load_preset(args.preset) if args.preset else {}
    values = {}
    for name in OPTION_TYPES:
        flag = getattr(args, name)
        if flag is not None:
            values[name] = flag
        elif name in preset:
            values[name] = preset[name]
    options = SlurmOptions(**values)
    if options.gpus_per_node is None:
        options.gpus_per_node = options.tasks_per_node
    if options.mail_type is not None:
        options.mail_type = options.mail_type.upper()
    options.validate()
    return options


# ------------------------------------------------------------------ configs


def config_files(fname: str, batch: bool) -> list[Path]:
    path = Path(fname)
    if not path.is_file():
        raise UserError(f"{'--batch-launch list' if batch else 'config file'} not found: {fname}")
    if not batch:
        return [path]
    try:
        listed = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        listed = None
    if not isinstance(listed, list) or not listed or not all(isinstance(x, str) for x in listed):
        raise UserError(f"--batch-launch: {fname} must be a YAML list of config files (- configs/a.yaml)")
    files = []
    for item in listed:
        candidates = [Path(item), path.parent / item]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"--batch-launch: {fname} lists {item}, which is neither a file here nor beside {fname}")
        files.append(found)
    return files


def load_job_configs(files: list[Path], overrides: list[str]) -> list[Config]:
    configs, seen = [], {}
    for path in files:
        cfg = load_config(path, overrides)
        # Absolute, so that the job and the printed paths do not depend on the working directory.
        cfg.logging.folder = str(Path(cfg.logging.folder).expanduser().resolve())
        key = (cfg.logging.folder, cfg.logging.write_tag)
        if key in seen:
            raise UserError(f"{path} and {seen[key]} write to the same logging.folder {cfg.logging.folder}: "
                            "give each config its own folder")
        seen[key] = path
        configs.append(cfg)
    return configs


# ------------------------------------------------------------------ sweeps


@dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: its overrides (in --sweep order), its folder name and its loaded config."""

    overrides: tuple[str, ...]
    name: str
    cfg: Config


def split_values(text: str) -> list[str]:
    """`5e-4,1e-3` -> ['5e-4', '1e-3']: commas inside brackets, braces or quotes belong to the value."""
    values, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return values


def parse_sweep(items: list[str], overrides: list[str]) -> list[tuple[str, list[str]]]:
    """--sweep KEY=V1,V2,... flags -> [(key, values)], refusing what would be ambiguous."""
    axes: list[tuple[str, list[str]]] = []
    plain = {item.partition("=")[0]: item for item in overrides}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or len(key.split(".")) not in (2, 3) or not all(key.split(".")):
            raise UserError(f"--sweep {item}: must look like section.key=value1,value2 "
                            "(e.g. optimization.lr=5e-4,1e-3)")
        if key == "logging.folder":
            raise UserError(f"--sweep {item}: each run's logging.folder is <logging.folder>/<its overrides>; sweep "
                            "other keys and give the sweep's folder as a plain override logging.folder=DIR")
        if key in plain:
            raise UserError(f"--sweep {item} and the override {plain[key]} both set {key}: drop one")
        earlier = next((f"{k}={','.join(v)}" for k, v in axes if k == key), None)
        if earlier is not None:
            raise UserError(f"--sweep {earlier} and --sweep {item} both sweep {key}: give its values in one --sweep")
        values = [value.strip() for value in split_values(text)]
        empty = next((i for i, v in enumerate(values) if not v), None)
        if empty is not None:
            raise UserError(f"--sweep {item}: value {empty + 1} is empty (for an empty string write '')")
        axes.append((key, values))
    return axes


def _label(text: str) -> str:
    """A value as it reads in a folder name: as typed when that is short and filesystem-safe, else a safe
    prefix and a hash of the whole value (so that different values never share a folder)."""
    if re.fullmatch(r"[A-Za-z0-9+-][A-Za-z0-9._+-]{0,39}", text):
        return text
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", text)[:24]
    return f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def run_name(keys: list[str], values: tuple[str, ...]) -> str:
    """The folder name of one sweep point, e.g. `lr=5e-4,batch_size=64`: each key by its last part unless two
    swept keys share it (then in full)."""
    short = [key.rsplit(".", 1)[1] for key in keys]
    names = [s if short.count(s) == 1 else key for s, key in zip(short, keys)]
    name = ",".join(f"{n}={_label(v)}" for n, v in zip(names, values))
    if len(name) > 200:  # file names stop at 255 bytes
        name = f"{name[:150]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def load_sweep(path: Path, overrides: list[str], items: list[str], base: Config) -> list[SweepRun]:
    """Every point of the Cartesian product of the --sweep flags, loaded and validated as ordinary overrides
    (after the plain ones), each in its own folder under the base config's logging.folder."""
    axes = parse_sweep(items, overrides)
    keys = [key for key, _ in axes]
    for key, values in axes:  # each value alone first, so that a bad one is named with its own --sweep
        for value in values:
            try:
                load_config(path, [*overrides, f"{key}={value}"])
            except UserError as exc:
                raise UserError(f"--sweep {key}={','.join(values)}: {one_line(exc)}") from None
    runs: list[SweepRun] = []
    by_name: dict[str, SweepRun] = {}
    by_config: dict[str, SweepRun] = {}
    for values in itertools.product(*(values for _, values in axes)):
        point = tuple(f"{key}={value}" for key, value in zip(keys, values))
        try:
            cfg = load_config(path, [*overrides, *point])
        except UserError as exc:
            raise UserError(f"--sweep point {' '.join(point)}: {one_line(exc)} (every combination of the --sweep "
                            "values runs: sweep these keys in separate submissions)") from None
        name = run_name(keys, values)
        cfg.logging.folder = str(Path(base.logging.folder) / name)
        run = SweepRun(point, name, cfg)
        if name in by_name:
            raise UserError(f"--sweep points {' '.join(by_name[name].overrides)} and {' '.join(point)} would share the "
                            f"folder {name}: make the values differ in their first 24 characters")
        resolved = dump_config(cfg).replace(cfg.logging.folder, "")
        if resolved in by_config:
            raise UserError(f"--sweep points {' '.join(by_config[resolved].overrides)} and {' '.join(point)} give "
                            "the same config: drop the repeated value")
        by_name[name] = by_config[resolved] = run
        runs.append(run)
    return runs


def sweep_manifest(path: Path, overrides: list[str], items: list[str], runs: list[SweepRun]) -> dict[str, Any]:
    """What sweep.json records about the runs (the submissions are added to it)."""
    return {"config": str(path.resolve()), "overrides": list(overrides),
            "sweep": {key: values for key, values in parse_sweep(items, overrides)},
            "runs": [{"task": i, "name": run.name, "overrides": list(run.overrides), "folder": run.cfg.logging.folder}
                     for i, run in enumerate(runs)],
            "submissions": []}


def previous_manifest(manifest_path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest to extend: the one already there when it describes the same sweep (a resubmission resumes
    every run), else the new one; another sweep in the same folder is refused."""
    if not manifest_path.exists():
        return manifest
    try:
        old = json.loads(manifest_path.read_text())
        same = all(old[key] == manifest[key] for key in ("config", "overrides", "sweep", "runs"))
        submissions = list(old["submissions"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{manifest_path} exists but is not a sweep manifest: choose another logging.folder") from None
    if not same:
        raise UserError(f"{manifest_path.parent} holds another sweep ({manifest_path}): choose another logging.folder, "
                        "or resubmit that sweep's own command to resume it")
    return {**manifest, "submissions": submissions}


def write_manifest(manifest_path: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1).encode() + b"\n"
    atomic_write(manifest_path, lambda f: f.write(text))


def check_partition(partition: Optional[str], controller_required: bool = True) -> None:
    """Refuse a partition that sinfo does not list. A controller that cannot be asked is an error
    before a real submission (sbatch would fail too) and a warning for --dry-run."""
    if partition is None or shutil.which("sinfo") is None:
        return
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
        problem = None if out.returncode == 0 else f"sinfo failed: {out.stderr.strip()}"
    except subprocess.TimeoutExpired:
        problem = "sinfo did not answer within 30 s: is the SLURM controller up?"
    if problem is not None:
        if controller_required:
            raise UserError(f"cannot check --partition {partition}: {problem}")
        print(f"warning: --partition {partition} not checked: {problem}", file=sys.stderr)
        return
    known = sorted(set(out.stdout.split()))
    if partition not in known:
        raise UserError(f"--partition {partition}: sinfo does not know it (partitions: {', '.join(known)})")


def sbatch_parameters(options: SlurmOptions, job_name: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "job_name": job_name, "time": options.time, "nodes": options.nodes,
        "ntasks_per_node": options.tasks_per_node, "cpus_per_task": options.cpus_per_task,
        "signal_delay_s": options.signal_delay,
    }
    for name in ("partition", "account", "qos", "exclude", "constraint", "nodelist", "mem", "mem_per_gpu",
                 "mail_type", "mail_user", "dependency", "array_parallelism"):
        if getattr(options, name) is not None:
            params[name] = getattr(options, name)
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    return params


def sbatch_script(folder: Path, params: dict[str, Any], count: int) -> str:
    """The script submitit writes for these parameters (what sbatch receives)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=count if count > 1 else None, **params)


def git_state(folder: Path) -> tuple[str, str]:
    """(commit and status lines, diff against HEAD) of the git repository holding `folder` (where the job
    is submitted from), or a note and no diff when there is none."""
    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=60)

    if shutil.which("git") is None or git("rev-parse", "--git-dir").returncode != 0:
        return f"not a git checkout: {folder}\n", ""
    root = git("rev-parse", "--show-toplevel").stdout.strip()
    head = git("rev-parse", "HEAD").stdout.strip()
    status = git("status", "--short").stdout
    return f"commit {head or '(none yet)'}\nrepository {root}\n{status}", git("diff", "HEAD").stdout


# ------------------------------------------------------------------ submission


def _warn_cpu_budget(configs: list[Config], labels: list[str], options: SlurmOptions) -> None:
    warnings = {f"warning: {label}: data.num_workers={cfg.data.num_workers} leaves no CPU of --cpus-per-task "
                f"{options.cpus_per_task} for the rank itself (workers will share cores)": None
                for cfg, label in zip(configs, labels) if cfg.data.num_workers >= options.cpus_per_task}
    for warning in warnings:  # once each: the runs of a sweep share their label
        print(warning, file=sys.stderr)


def _sweep_table(runs: list[SweepRun], job_ids: list[str]) -> str:
    rows = [("task", "job", "overrides", "logging.folder")]
    rows += [(str(i), job, " ".join(run.overrides), run.cfg.logging.folder)
             for i, (run, job) in enumerate(zip(runs, job_ids))]
    widths = [max(len(row[col]) for row in rows) for col in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows)


def submit(args: argparse.Namespace, command_line: str) -> int:
    options = resolve_options(args)
    files = config_files(args.fname, args.batch_launch)
    stray = next((item for item in args.overrides if "=" not in item), None)
    if args.sweep and stray is not None:
        raise UserError(f"override {stray} must look like section.key=value; the values of a --sweep are separated "
                        "by commas without spaces (--sweep 'optimization.lr=5e-4,1e-3')")
    configs = load_job_configs(files, args.overrides)
    labels = [str(path) for path in files]
    runs: list[SweepRun] = []
    if args.sweep:
        if args.batch_launch:
            raise UserError("--sweep with --batch-launch: sweep one config (--fname) at a time")
        runs = load_sweep(files[0], args.overrides, args.sweep, configs[0])
        manifest_path = Path(configs[0].logging.folder) / "sweep.json"
        configs, labels = [run.cfg for run in runs], [str(files[0])] * len(runs)
        manifest = previous_manifest(manifest_path, sweep_manifest(files[0], args.overrides, args.sweep, runs))
    check_partition(options.partition, controller_required=not args.dry_run)
    folder = Path(args.folder).expanduser().resolve() / "job_%j"
    job_name = options.job_name or ("ijepa-batch" if args.batch_launch else f"ijepa-{files[0].stem}")
    params = sbatch_parameters(options, job_name)
    jobs_to_submit = [SlurmTrainingJob(cfg, options) for cfg in configs]

    if args.dry_run:
        _warn_cpu_budget(configs, labels, options)
        print(f"# dry run: nothing submitted. sbatch script ({folder}/..._submission.sh):")
        print(sbatch_script(folder, params, len(configs)))
        if runs:
            tasks = [f"ID_{i}" for i in range(len(runs))] if len(runs) > 1 else ["ID"]
            print(f"# sweep: {len(runs)} run(s), manifest {manifest_path}")
            print(_sweep_table(runs, tasks))
            print("# resolved config of task 0 (the others differ only by their overrides and logging.folder):")
            print(dump_config(configs[0]))
            return 0
        for cfg, label in zip(configs, labels):
            print(f"# resolved config of {label} (logging.folder gets the CSVs and checkpoints):")
            print(dump_config(cfg))
        return 0

    for cfg in configs:
        try:
            Path(cfg.logging.folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"logging.folder {cfg.logging.folder} cannot be created ({exc.strerror}): "
                            "choose a folder the job can write") from None
        if not os.access(cfg.logging.folder, os.W_OK):
            raise UserError(f"logging.folder {cfg.logging.folder} is not writable: choose a folder the job can write")

    _warn_cpu_budget(configs, labels, options)

    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=SUBMITIT_MAX_NUM_TIMEOUT)
    executor.update_parameters(**params)
    commit, diff = git_state(Path.cwd())
    started = time.time()
    try:
        if len(jobs_to_submit) == 1:
            jobs = [executor.submit(jobs_to_submit[0])]
        else:
            with executor.batch():
                jobs = [executor.submit(job) for job in jobs_to_submit]
    except (FailedJobError, FailedSubmissionError) as exc:
        message = " ".join(str(exc).split())
        print(f"error: sbatch refused the submission: {message}", file=sys.stderr)
        return 1
    for job, cfg in zip(jobs, configs):
        record = job.paths.folder
        record.mkdir(parents=True, exist_ok=True)
        (record / "config.yaml").write_text(dump_config(cfg, run_info()))
        (record / "command.txt").write_text(command_line + "\n")
        (record / "git.txt").write_text(commit)
        (record / "git.diff").write_text(diff)
    base = jobs[0].job_id.split("_")[0]
    shape = (f"{options.nodes} node(s) x {options.tasks_per_node} task(s), {options.gpus_per_node or 'no'} GPU(s) "
             f"per node, {options.time} min")
    if runs:
        manifest["submissions"].append({
            "array_job_id": base, "jobs": [job.job_id for job in jobs], "command": command_line,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "submitit_folders": [str(job.paths.folder) for job in jobs]})
        write_manifest(manifest_path, manifest)
        at_once = min(len(jobs), options.array_parallelism)
        print(f"submitted sweep as {'array ' if len(jobs) > 1 else ''}job {base} ({job_name}): {len(jobs)} run(s), "
              f"{at_once} at a time; each {shape}")
        print(_sweep_table(runs, [job.job_id for job in jobs]))
        print(f"  sweep manifest: {manifest_path}")
        if len(jobs) > 1:
            print(f"  sbatch script: {jobs[0].paths.folder.parent}/job_{base}/{base}_submission.sh")
        record = jobs[0].paths.folder if len(jobs) == 1 else f"{jobs[0].paths.folder.parent}/job_{base}_<task>/"
        print(f"  submitit files (rank logs), config and git record: {record}")
        print(f"  watch: squeue -j {base}   or   sacct -j {base} -X -o JobID,JobName,State,Elapsed,ExitCode")
        return 0
    for job, cfg, label in zip(jobs, configs, labels):
        print(f"submitted job {job.job_id} ({job_name}, {label}): {shape}")
        print(f"  logging.folder (CSVs, checkpoints): {cfg.logging.folder}")
        print(f"  submitit files, config and git record: {job.paths.folder}")
        print(f"  rank 0 log: {job.paths.stdout}  (stderr: {job.paths.stderr})")
        print(f"  watch: squeue -j {job.job_id.split('_')[0]}   or   sacct -j {job.job_id} -X -o "
              "JobID,JobName,State,Elapsed,ExitCode")
    return 0


# ------------------------------------------------------------------ the job


def classify_signal(elapsed_s: float, time_min: int, signal_delay_s: int) -> str:
    """'time-limit' when a USR2 came at the end of the allocation, else 'preemption'."""
    return "time-limit" if elapsed_s >= time_min * 60 - signal_delay_s - EARLY_SIGNAL_SLACK_S else "preemption"


def decide_requeue(history: dict, *, signals: tuple[str, ...], step: Any, elapsed_s: float, time_min: int,
                   signal_delay_s: int, max_requeues: int) -> dict:
    """Whether a stopped run is requeued; returns {requeue, kind, reason, history}."""
    if "SIGUSR2" not in signals:
        return {"requeue": False, "kind": "stopped", "history": history,
                "reason": f"stopped by {'/'.join(signals) or 'request'} at step {step}; not requeued by this job "
                          "(SLURM itself requeues a preempted job whose partition has PreemptMode=REQUEUE)"}
    kind = classify_signal(elapsed_s, time_min, signal_delay_s)
    if history.get("last_requeue_step") == step:
        return {"requeue": False, "kind": kind, "history": history,
                "reason": f"{kind} at step {step} again: no step completed since the previous requeue; stopping "
                          "instead of looping (is --signal-delay too close to --time?)"}
    if kind == "time-limit" and history.get("time_limit_requeues", 0) >= max_requeues:
        return {"requeue": False, "kind": kind, "history": history,
                "reason": f"time limit reached at step {step} after {max_requeues} time-limit requeue(s): "
                          "--max-requeues exhausted; resubmit the same command to continue"}
    new = dict(history)
    counter = "time_limit_requeues" if kind == "time-limit" else "preemption_requeues"
    new[counter] = new.get(counter, 0) + 1
    new["last_requeue_step"] = step
    return {"requeue": True, "kind": kind, "history": new,
            "reason": f"{kind} at step {step}: requeued ({new.get('time_limit_requeues', 0)}/{max_requeues} "
                      f"time-limit requeues used, {new.get('preemption_requeues', 0)} preemption(s))"}


def master_port(job_id: str, restart: int) -> int:
    # A requeued job keeps its id: a new port per restart avoids the old run's socket.
    # Below Linux's ephemeral range (32768-60999), so no outgoing connection of the node holds it already.
    return random.Random(f"{job_id}/{restart}").randint(20000, 32000)


def _say(message: str) -> None:
    print(f"[slurm] {time.strftime('%H:%M:%S')} {message}", flush=True)


class SlurmTrainingJob:
    """The submitted callable: one call per task; `checkpoint()` is submitit's requeue hook."""

    def __init__(self, cfg: Config, options: SlurmOptions, history: Optional[dict] = None):
        self.cfg = cfg
        self.options = options
        self.history = dict(history or {})
        self._decision: Optional[dict] = None

    def device_name(self, local_rank: int) -> str:
        if not self.options.gpus_per_node:
            return "cpu"
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(f"--gpus-per-node {self.options.gpus_per_node} but the job sees no CUDA device")
        # One visible GPU: SLURM bound one GPU to each task; else the node's GPUs are all visible.
        return f"cuda:{local_rank if count > 1 else 0}"

    def cpu_threads(self) -> Optional[int]:
        if "OMP_NUM_THREADS" in os.environ:
            return None
        return max(1, self.options.cpus_per_task - self.cfg.data.num_workers)

    def __call__(self) -> dict:
        import submitit

        from ..distributed import env as dist_utils
        from ..procutil import block_stop_signals
        from .entry import run_rank

        # A stop signal from here on waits for run_rank's handler (which unblocks it): it then
        # becomes a stop agreed before the first step, saved, and requeued like any other.
        block_stop_signals()
        started = time.time()
        env = submitit.JobEnvironment()
        rank, world, local_rank = env.global_rank, env.num_tasks, env.local_rank
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        os.environ.update(MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(master_port(env.job_id, restart)),
                          RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                          LOCAL_WORLD_SIZE=str(world // env.num_nodes))
        if rank == 0:
            _say(f"job {env.job_id} run {restart + 1} (SLURM_RESTART_COUNT={restart}): {world} rank(s) on "
                 f"{env.num_nodes} node(s), master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}; "
                 f"requeues so far: {self.history or 'none'}; logging.folder {self.cfg.logging.folder}")
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        self._decision = None

        def agree(result) -> None:  # every rank, after the checkpoint of the stop step is committed
            decision = None
            if rank == 0:
                decision = decide_requeue(
                    self.history, signals=result.signals, step=result.step, elapsed_s=time.time() - started,
                    time_min=self.options.time, signal_delay_s=self.options.signal_delay,
                    max_requeues=self.options.max_requeues)
            self._decision = dist_utils.broadcast_object(decision)

        try:
            result = run_rank(self.cfg, rank, world, self.device_name(local_rank), local_rank=local_rank,
                              cpu_threads=self.cpu_threads(), on_stop=agree,
                              on_hang=functools.partial(self.after_hang, env.job_id))
        except (UserError, FileNotFoundError) as exc:
            if rank == 0:
                _say(f"error: {one_line(exc)}\nnot requeued: a user error stops the job (fix it and resubmit)")
            raise
        except Exception as exc:
            if rank == 0:
                cause = one_line(exc) if isinstance(exc, RunFailure) else f"{type(exc).__name__}: {exc}"
                if getattr(exc, "peer_failure", None):  # this rank's collective broke because that rank failed
                    peer = exc.peer_failure
                    cause = f"rank {peer['rank']} failed first (step {peer['step']}, {peer['host']}): {peer['error']}"
                _say(f"failed: {cause}\nnot requeued: a failed run stops the job (the newest checkpoint in "
                     f"{self.cfg.logging.folder} is kept; resubmit to resume)")
            raise
        summary = {"completed": result.completed, "step": result.step, "stop_reason": result.stop_reason,
                   "signals": list(result.signals), "history": self.history}
        if result.completed or result.stop_reason != "signal" or self._decision is None:
            return summary
        decision = self._decision
        if rank == 0:
            _say(decision["reason"])
        if not decision["requeue"]:
            if decision["kind"] == "stopped":
                return summary
            from submitit.core.utils import UncompletedJobError

            raise UncompletedJobError(decision["reason"])
        if rank != 0:
            self._wait_for_requeue()
        if not callable(submitit_handler):
            raise RuntimeError("submitit's USR2 handler is missing: not running under submitit?")
        # submitit's protocol: it calls self.checkpoint(), stores the next submission, runs
        # `scontrol requeue` and exits this process.
        submitit_handler(signal.SIGUSR2, None)
        return summary

    def after_hang(self, job_id: str, line: str) -> None:
        """Called by the one rank that reports a hang or a lost rank (its watchdog then ends it): requeue the
        job, which ends every task on every node, the stopped ones included; or cancel it when the run ends
        this way again without having committed a newer checkpoint (a rank that crashes at the same step
        every time is a bug, not bad luck), or after --max-requeues such ends."""
        from ..checkpoint.files import CheckpointFiles
        from ..distributed.watchdog import hang_count, should_retry_after_hang

        kind = "hang" if line.startswith("no step completed") else "lost rank"
        committed = CheckpointFiles(self.cfg.logging.folder, self.cfg.logging.write_tag).latest_step()
        retry = should_retry_after_hang(self.cfg.logging.folder, committed)
        hangs = hang_count(self.cfg.logging.folder)
        if retry and hangs <= self.options.max_requeues:
            _say(f"{kind}: {line}; requeued to resume from the checkpoint of step {committed} "
                 f"(hang or lost rank {hangs} of at most {self.options.max_requeues})")
            command = ["scontrol", "requeue", job_id]
        else:
            why = ("no newer checkpoint since the previous hang or lost rank" if not retry
                   else f"{hangs} hangs or lost ranks: --max-requeues exhausted")
            _say(f"{kind}: {line}; not requeued ({why}); the newest checkpoint (step {committed}) is kept: "
                 f"resubmit to resume")
            command = ["scancel", job_id]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=60)
            problem = None if out.returncode == 0 else (out.stderr.strip() or f"exit status {out.returncode}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = str(exc)
        if problem is not None:  # e.g. this node lost its link to the controller too
            _say(f"{' '.join(command)} failed: {problem}")

    @staticmethod
    def _wait_for_requeue() -> None:
        # Rank 0 requeues the job; SLURM then ends every task with SIGTERM. Leave at once then,
        # so the job restarts without waiting for KillWait.
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
        deadline = time.time() + WAIT_FOR_REQUEUE_S
        while time.time() < deadline:
            time.sleep(1)
        raise RuntimeError(f"rank 0 did not requeue the job within {WAIT_FOR_REQUEUE_S} s")

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's requeue hook: the next submission, or None to stop (reason logged)."""
        import submitit

        decision = self._decision
        if decision is None:
            # USR2 outside training (start-up, or after the end): nothing new to save.
            decision = decide_requeue(self.history, signals=("SIGUSR2",), step="start-up", elapsed_s=0.0,
                                      time_min=self.options.time, signal_delay_s=self.options.signal_delay,
                                      max_requeues=self.options.max_requeues)
            _say(decision["reason"])
        if not decision["requeue"]:
            return None
        return submitit.helpers.DelayedSubmission(
            SlurmTrainingJob(copy.deepcopy(self.cfg), self.options, history=decision["history"]))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_decision"] = None
        return state


__all__ = ["SlurmOptions", "SlurmTrainingJob", "resolve_options", "submit", "decide_requeue", "classify_signal"]
