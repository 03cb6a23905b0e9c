"""Check a machine with CUDA GPUs end to end in a few minutes, within a hard time budget.

    bash launch/gpu_check.sh --out gpu_check              # at most about 7.75 min
    bash launch/gpu_check.sh --quick --out gpu_check      # at most about 3.75 min
    bash launch/gpu_check.sh --device cpu --quick --out /tmp/gc   # the CPU mode CI runs (tiny sizes)

Five parts, each check in its own subprocess under its own timeout, so an out-of-memory error, an NCCL
crash or a segfault fails that check (with its cause line) and the rest still runs:
1. environment: torch, CUDA, cuDNN, NCCL, driver, GPUs, bfloat16, which SDPA backends run;
2. process group: all-reduce and broadcast values at world 1 and over all local GPUs (gloo on CPU);
3. correctness: the demo recipe on Fashion-MNIST shards made here, stopped mid-epoch and resumed, per-step
   losses against the uninterrupted run, then `eval knn`;
4. speed and memory: `bench-step` of ViT-H/14 and ViT-B/16 at 224 px in bfloat16, DDP-of-one and
   FSDP-of-one, activation checkpointing and compile on and off, peak memory beside `plan`'s estimate;
5. data: `bench-data` with one worker per core beside the images/s each model's step consumes.
Every part has a share of the budget; time one part leaves is the next one's. `gpu_check.json` and
`gpu_check.md` in --out are rewritten after every check, so a killed run leaves what finished.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

PARTS = ("environment", "process_group", "correctness", "speed", "data")
# Seconds per part; what a part leaves over goes to the next.  Full: 7.75 min, quick: 3.75 min.
BUDGETS = {
    ("cuda", False): {"environment": 25, "process_group": 40, "correctness": 100, "speed": 250, "data": 50},
    ("cuda", True): {"environment": 15, "process_group": 20, "correctness": 55, "speed": 115, "data": 20},
    ("cpu", False): {"environment": 20, "process_group": 30, "correctness": 90, "speed": 120, "data": 40},
    ("cpu", True): {"environment": 15, "process_group": 30, "correctness": 60, "speed": 40, "data": 25},
}
MIN_CHECK_S = 5.0  # a check with less time than this left is skipped, not started
ROOT = Path(__file__).resolve().parents[3]
RESULT_PREFIX = "gpu-check-result: "
# A resumed run's losses after the stop must match the uninterrupted run's: bitwise where the kernels are
# deterministic (CPU), within this relative tolerance on CUDA (non-deterministic reductions in backward).
CUDA_LOSS_RTOL = 1e-2


# ------------------------------------------------------------------------------------------ report
@dataclass
class Check:
    part: str
    name: str
    status: str  # PASS, FAILED, SKIPPED, INFO
    seconds: float = 0.0
    result: str = ""
    cause: str = ""
    log: str = ""
    data: dict = field(default_factory=dict)


class Report:
    """The rows so far, printed as they come and written to gpu_check.json / gpu_check.md after each."""

    def __init__(self, out: Path, header: dict, stream=None):
        self.out, self.header, self.stream = out, header, stream or sys.stdout
        self.checks: list[Check] = []
        self.parts: dict[str, dict] = {}
        self.finished = False
        self.started = time.monotonic()
        print(f"gpu-check: {header['mode']}, budget {header['budget_s']:.0f} s; writing {out}/gpu_check.json "
              f"and gpu_check.md", file=stream, flush=True)
        print(f"{'part':<14} {'check':<38} {'status':<7} {'s':>6}  result", file=stream, flush=True)
        self.write()

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(f"{check.part:<14} {check.name:<38} {check.status:<7} {check.seconds:>6.1f}  {row_text(asdict(check))}",
              file=self.stream, flush=True)
        self.write()
        return check

    def part_status(self, part: str) -> str:
        statuses = [c.status for c in self.checks if c.part == part]
        if not statuses:
            return "SKIPPED"
        if "FAILED" in statuses:
            return "FAILED"
        if all(s == "SKIPPED" for s in statuses):
            return "SKIPPED"
        return "PASS"

    def end_part(self, part: str, budget_s: float, seconds: float) -> None:
        self.parts[part] = {"status": self.part_status(part), "budget_s": budget_s, "seconds": round(seconds, 1)}
        self.write()

    def document(self) -> dict:
        return {**self.header, "finished": self.finished, "elapsed_s": round(time.monotonic() - self.started, 1),
                "parts": self.parts, "checks": [asdict(c) for c in self.checks]}

    def write(self) -> None:
        from ..fileutil import atomic_write

        doc = self.document()
        atomic_write(self.out / "gpu_check.json", lambda f: f.write(json.dumps(doc, indent=1).encode()))
        atomic_write(self.out / "gpu_check.md", lambda f: f.write(markdown(doc).encode()))


def row_text(check: dict) -> str:
    """The result, and the cause of a failure where the result does not say it already."""
    result, cause = check["result"], check["cause"]
    if not cause or cause in result:
        return result
    return f"{result} -- {cause}" if result else cause


def markdown(doc: dict) -> str:
    state = "finished" if doc["finished"] else "NOT finished (killed or still running)"
    lines = [f"# gpu-check: {doc['mode']}", "",
             f"{doc['started']}, `{doc['command']}`, {state} after {doc['elapsed_s']:.0f} s of a "
             f"{doc['budget_s']:.0f} s budget.", "",
             "| part | status | seconds | budget s |", "|---|---|---|---|"]
    for part in PARTS:
        p = doc["parts"].get(part)
        lines.append(f"| {part} | {p['status']} | {p['seconds']:.0f} | {p['budget_s']:.0f} |" if p
                     else f"| {part} | not run | | |")
    lines += ["", "| part | check | status | s | result |", "|---|---|---|---|---|"]
    for c in doc["checks"]:
        lines.append(f"| {c['part']} | {c['name']} | {c['status']} | {c['seconds']:.1f} | "
                     f"{row_text(c).replace('|', '/')} |")
    speed = [c for c in doc["checks"] if c["part"] == "speed" and c["status"] == "PASS"]
    if speed:
        lines += ["", "## Speed and memory", "",
                  "| check | batch | img/s | step ms | target fwd / context fwd / predictor / backward / optimizer / "
                  "EMA ms | MFU | matmul TFLOP/s | peak GiB | plan GiB | compile s |", "|---|" + "---|" * 9]
        for c in speed:
            d = c["data"]
            phases = " / ".join(f"{v:.1f}" for v in d["phases_ms"].values())
            lines.append(f"| {c['name']} | {d['batch']} | {d['images_per_s']:.1f} | {d['step_ms']:.1f} | {phases} | "
                         f"{100 * d['mfu']:.1f} % | {d['matmul_peak_tflops']:.3g} | {d['peak_gib']:.3g} | "
                         f"{d['plan_gib']:.3g} | {d['compile_s']:.1f} |")
    failed = [c for c in doc["checks"] if c["status"] == "FAILED"]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {c['part']} / {c['name']}: {c['cause']} (log: `{c['log']}`)" for c in failed]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ subprocesses
@dataclass
class Proc:
    returncode: Optional[int]
    output: str
    seconds: float
    timed_out: bool


_running: Optional[subprocess.Popen] = None


def run_command(args: list[str], timeout: float, log: Path, env: Optional[dict] = None) -> Proc:
    """Run `args` in its own process group (ranks and loader workers included), output to `log`; on
    timeout the whole group is killed."""
    global _running
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(args) + "\n")
        f.flush()
        _running = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env or child_env(),
                                    start_new_session=True)
        timed_out = False
        try:
            _running.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_running()
        code = _running.returncode
        _running = None
    return Proc(code, log.read_text(errors="replace"), time.monotonic() - start, timed_out)


def kill_running() -> None:
    if _running is not None and _running.poll() is None:
        try:
            os.killpg(_running.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _running.wait()


def child_env() -> dict:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ijepa_scale.cli", *args]


def worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "ijepa_scale.benchmarks.gpu_check", *args]


CAUSE_PATTERNS = (
    re.compile(r"(torch\.)?(cuda\.)?OutOfMemoryError.*|.*CUDA out of memory.*"),
    re.compile(r".*(NCCL|nccl) (error|Error|WARN).*|.*ncclInternalError.*|.*ncclUnhandledCudaError.*"),
    re.compile(r"^error: .*"),
    re.compile(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b:? ?.*"),
    re.compile(r".*Segmentation fault.*|.*core dumped.*"),
)


def cause_line(proc: Proc, timeout: float) -> str:
    """The one line that says why a check failed."""
    if proc.timed_out:
        return f"timed out after {timeout:.0f} s (its share of the budget)"
    lines = [line.strip() for line in proc.output.splitlines() if line.strip()]
    for pattern in CAUSE_PATTERNS:
        for line in reversed(lines):
            if pattern.match(line):
                return line[:300]
    if proc.returncode is not None and proc.returncode < 0:
        return f"killed by {signal.Signals(-proc.returncode).name}"
    return f"exit {proc.returncode}: {lines[-1][:300] if lines else 'no output'}"


def result_of(proc: Proc) -> Optional[dict]:
    """The JSON a worker printed after RESULT_PREFIX."""
    for line in reversed(proc.output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def last_json_line(text: str) -> Optional[dict]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


# ------------------------------------------------------------------------------------------ the run
class Budget:
    """Cumulative deadlines: part i ends by start + the budgets of parts 0..i, and everything by the total."""

    def __init__(self, budgets: dict[str, float], scale: float = 1.0):
        self.start = time.monotonic()
        self.budgets = {k: v * scale for k, v in budgets.items()}
        self.total = sum(self.budgets.values())
        self.part_end = {}
        acc = 0.0
        for part in PARTS:
            acc += self.budgets[part]
            self.part_end[part] = self.start + acc

    def left(self, part: str) -> float:
        return self.part_end[part] - time.monotonic()


class GpuCheck:
    def __init__(self, device: str, quick: bool, out: Path, budget_scale: float, command: str, stream=None):
        self.device, self.quick, self.out = device, quick, out
        self.cuda = device == "cuda"
        self.budget = Budget(BUDGETS[(device, quick)], budget_scale)
        header = {"command": command, "mode": f"{device}{' quick' if quick else ''}",
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "budget_s": self.budget.total, "host": platform.node()}
        self.report = Report(out, header, stream)
        self.env: dict = {}
        self.shards: dict[str, str] = {}
        self.speed: dict[str, dict] = {}  # size label -> the best eager DDP row's data

    # ----------------------------------------------------------------- helpers
    def run_check(self, part: str, name: str, args: list[str], cap_s: float) -> tuple[Optional[Proc], Check]:
        """Run one check's command within min(cap_s, what the part has left)."""
        left = self.budget.left(part)
        log = self.out / "logs" / f"{part}-{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.log"
        check = Check(part, name, "PASS", log=str(log.relative_to(self.out)))
        if left < MIN_CHECK_S:
            check.status, check.result = "SKIPPED", f"out of time ({max(left, 0):.0f} s left of the part's budget)"
            return None, check
        timeout = min(cap_s, left)
        proc = run_command(args, timeout, log)
        check.seconds = proc.seconds
        if proc.returncode != 0 or proc.timed_out:
            check.status, check.cause = "FAILED", cause_line(proc, timeout)
        return proc, check

    def skip(self, part: str, name: str, why: str) -> None:
        self.report.add(Check(part, name, "SKIPPED", result=why))

    def fail(self, check: Check, cause: str) -> Check:
        check.status, check.cause = "FAILED", cause
        return self.report.add(check)

    # ----------------------------------------------------------------- parts
    def run(self) -> int:
        for part in PARTS:
            start = time.monotonic()
            try:
                getattr(self, f"part_{part}")()
            except Exception as exc:  # a bug in this script's own part logic must not stop the other parts
                self.report.add(Check(part, "(part)", "FAILED", cause=f"{type(exc).__name__}: {exc}"))
            self.report.end_part(part, self.budget.budgets[part], time.monotonic() - start)
        self.report.finished = True
        self.report.write()
        failed = [p for p, s in self.report.parts.items() if s["status"] == "FAILED"]
        skipped = [p for p, s in self.report.parts.items() if s["status"] == "SKIPPED"]
        verdict = "; ".join(([f"FAILED: {', '.join(failed)}"] if failed else [])
                            + ([f"not run (out of time): {', '.join(skipped)}"] if skipped else [])) \
            or "every part passed"
        elapsed = time.monotonic() - self.budget.start
        print(f"gpu-check: {verdict} in {elapsed:.0f} s; {self.out}/gpu_check.md", file=self.report.stream,
              flush=True)
        return 1 if failed or skipped else 0

    def part_environment(self) -> None:
        proc, check = self.run_check("environment", "versions, devices, SDPA", worker("environment", self.device),
                                     60)
        if proc is None or check.status == "FAILED":
            self.report.add(check)
            return
        info = result_of(proc) or {}
        self.env = info
        check.data = info
        if self.cuda:
            gpus = info.get("gpus", [])
            check.result = (f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, NCCL {info['nccl']}, "
                            f"driver {info['driver']}; {len(gpus)} x {gpus[0]['name'] if gpus else '?'} "
                            f"{gpus[0]['memory_gib'] if gpus else 0:.0f} GiB; bf16 {info['bf16']}")
        else:
            check.result = (f"torch {info['torch']}, {info['cpus']} CPUs, capability {info['cpu_capability']}; "
                            f"no CUDA (CPU mode)")
        self.report.add(check)
        sdpa = info.get("sdpa", {})
        self.report.add(Check("environment", "SDPA backends", "INFO", result=", ".join(
            f"{name} {'yes' if ok is True else 'no'}" for name, ok in sdpa.items()), data=sdpa))

    def part_process_group(self) -> None:
        backend = "nccl" if self.cuda else "gloo"
        worlds = [1]
        if self.cuda and len(self.env.get("gpus", [])) > 1:
            worlds.append(len(self.env["gpus"]))
        elif not self.cuda:
            worlds.append(2)  # two CPU ranks: the multi-rank path of the same check
        for world in worlds:
            proc, check = self.run_check("process_group", f"{backend} world {world}",
                                         worker("process-group", self.device, str(world)), 60)
            if proc is not None and not proc.timed_out:
                r = result_of(proc) or {}
                check.data = r
                if r and not r.get("ok"):
                    self.fail(check, r.get("error") or "wrong values")
                    continue
            if check.status == "PASS":
                bw = f", all-reduce bus bandwidth {r['busbw_gbs']:.1f} GB/s" if r.get("busbw_gbs") else ""
                check.result = f"all-reduce and broadcast values right on {world} rank(s){bw}"
            self.report.add(check)

    def _make_fmnist(self, split: str, per_class: int, shards: int) -> Optional[str]:
        folder = self.out / "data" / "fmnist"
        proc, check = self.run_check("correctness", f"fashion-mnist {split} shards",
                                     cli("fashion-mnist", "--out", str(folder), "--split", split, "--per-class",
                                         str(per_class), "--num-shards", str(shards)), 120)
        if proc is not None and check.status == "PASS":
            check.result = f"{per_class * 10} images in {shards} shards"
        self.report.add(check)
        if check.status != "PASS":
            return None
        return str(folder / f"fmnist-{split}-{{000000..{shards - 1:06d}}}.tar")

    def part_correctness(self) -> None:
        if self.cuda:
            per_class, batch, stop = 320, 64, 30  # 3,200 images: 50 steps per epoch, 2 epochs = 100 steps
            model = []
        else:
            per_class, batch, stop = 8, 8, 7  # 80 images: 10 steps per epoch, 20 steps
            model = ["meta.embed_dim=48", "meta.depth=2", "meta.num_heads=3", "meta.pred_depth=1",
                     "meta.pred_emb_dim=24"]
        train = self._make_fmnist("train", per_class, 4)
        if train is None:
            return
        self.shards["fmnist"] = train
        device = "cuda:0" if self.cuda else "cpu"
        base = ["--fname", "configs/demo_fmnist_vit_tiny.yaml", "--devices", device, f"data.shards={train}",
                f"data.batch_size={batch}", "optimization.epochs=2", "checkpoint.every_steps=0",
                f"data.num_workers={2 if self.cuda else 1}", "logging.log_freq=10", *model]
        runs = self.out / "runs"
        cmd = [sys.executable, str(ROOT / "main.py")]
        full = runs / "uninterrupted"
        resumed = runs / "resumed"
        for name, folder, extra in (("train uninterrupted", full, []),
                                    (f"train, stop at step {stop}", resumed, [f"optimization.stop_at_step={stop}"]),
                                    ("train, resume", resumed, [])):
            proc, check = self.run_check("correctness", name, cmd + base + [f"logging.folder={folder}", *extra], 120)
            if proc is not None and check.status == "PASS":
                steps = len(read_losses(folder))
                check.result = f"{steps} steps logged" + (" (resumed)" if "resumed from" in proc.output else "")
                if extra and steps != stop:
                    check.status, check.cause = "FAILED", f"stopped after {steps} steps, not at step {stop}"
                elif name == "train, resume" and "resumed from" not in proc.output:
                    check.status, check.cause = "FAILED", "the run did not resume from the stopped run's checkpoint"
            self.report.add(check)
            if check.status != "PASS":
                return
        compare = Check("correctness", "resumed losses vs uninterrupted", "PASS")
        compare.data = compare_losses(read_losses(full), read_losses(resumed), stop, bitwise=not self.cuda)
        compare.result = compare.data["summary"]
        if not compare.data["ok"]:
            compare.status, compare.cause = "FAILED", compare.data["summary"]
        self.report.add(compare)

        test = self._make_fmnist("test", max(per_class // 4, 4), 1)
        if test is None:
            return
        knn_csv = self.out / "knn.csv"
        proc, check = self.run_check("correctness", "eval knn", cli(
            "eval", "knn", "--checkpoint", str(full), "--train-shards", train, "--val-shards", test,
            "--devices", device, "--csv", str(knn_csv), "--num-workers", "1"), 90)
        if proc is not None and check.status == "PASS":
            with open(knn_csv, newline="") as f:
                rows = list(csv.DictReader(f))
            check.data = rows[-1]
            check.result = (f"k-NN accuracy {float(rows[-1]['accuracy']):.3f} on {rows[-1]['n_val']} test images "
                            f"(chance 0.1)")
        self.report.add(check)

    # ----------------------------------------------------------------- speed
    def speed_sizes(self) -> list[tuple[str, str, list[str]]]:
        if self.cuda:
            common = ["data.root_path=/unused", "distributed.dtype=bfloat16"]
            return [("ViT-H/14", "configs/in1k_vith14_ep300.yaml", common),
                    ("ViT-B/16", "configs/in1k_vitb16_ep600.yaml", common)]
        # Tiny stand-ins: the same commands and wrappers, sizes that take seconds on a CPU.
        tiny = ["data.batch_size=8", "data.crop_size=32", "meta.embed_dim=48", "meta.depth=2", "meta.num_heads=3",
                "meta.pred_depth=1", "meta.pred_emb_dim=24", "mask.min_keep=2"]
        return [("tiny/8", "configs/bench_official_tiny.yaml", tiny),
                ("tiny/16", "configs/bench_official_tiny.yaml", tiny + ["mask.patch_size=16", "data.crop_size=64"])]

    def speed_rows(self) -> list[tuple[int, str, bool, bool, bool]]:
        """(size index, parallel, activation checkpointing, compile, vs official), most wanted first: the
        deadline cuts the tail."""
        if self.quick and not self.cuda:  # every wrapper and option once, in as few processes as possible
            return [(0, "ddp", False, False, False), (1, "fsdp", True, False, True)]
        if self.quick:
            return [(0, "ddp", False, False, False), (1, "ddp", False, False, True), (0, "fsdp", True, True, False)]
        rows = [(0, "ddp", False, False, False), (1, "ddp", False, False, True), (0, "fsdp", True, False, False)]
        if self.cuda:
            rows.append((0, "ddp", False, True, False))
        rows += [(0, "ddp", True, False, False), (0, "fsdp", False, False, False)]
        if self.cuda:
            rows += [(1, "ddp", False, True, False), (0, "fsdp", True, True, False)]
        return rows

    def part_speed(self) -> None:
        sizes = self.speed_sizes()
        gpus = self.env.get("gpus") or [{}]
        gpu_gib = gpus[0].get("memory_gib", 80.0)  # 80 where the environment part failed
        steps, warmup = (6, 2) if self.quick else (10, 3)
        if not self.cuda:
            self.skip("speed", "compile on and off", "not on CPU: compiling takes minutes there; --device cuda does")
        for row in self.speed_rows():
            try:
                self.speed_row(sizes, row, steps, warmup, gpu_gib)
            except Exception as exc:  # this row's set-up (config, plan) failed: the next rows still run
                self.report.add(Check("speed", f"{sizes[row[0]][0]} {row[1:]}", "FAILED",
                                      cause=f"{type(exc).__name__}: {exc}"))

    def speed_row(self, sizes, row, steps: int, warmup: int, gpu_gib: float) -> None:
        from ..benchmarks.plan import GIB, estimate, mean_tokens
        from ..config import load_config

        index, parallel, ac, compiled, official = row
        label, fname, overrides = sizes[index]
        overrides = overrides + [f"distributed.parallel={parallel}",
                                 f"distributed.activation_checkpointing={str(ac).lower()}",
                                 f"distributed.compile={str(compiled).lower()}"]
        name = f"{label} {'FSDP' if parallel == 'fsdp' else 'DDP'}-of-one{' +AC' if ac else ''}" \
               f"{' +compile' if compiled else ''}{' vs official' if official else ''}"
        key = f"{parallel}{'_ac' if ac else ''}"
        cfg = load_config(ROOT / fname, overrides)
        k_ctx, k_tgt = mean_tokens(cfg)

        def planned(batch: int) -> dict:  # plan's estimate for one GPU in this row's mode
            at = load_config(ROOT / fname, overrides + [f"data.batch_size={batch}"])
            return estimate(at, at.meta.model_name, 1, k_ctx, k_tgt, override_dims=True)[key]

        batch, why = cfg.data.batch_size, "official" if self.cuda else "tiny CPU stand-in"
        plan_total = planned(batch)
        while self.cuda and batch > 8 and plan_total["fits"] > gpu_gib * GIB:
            batch //= 2
            why, plan_total = f"largest plan fits in {gpu_gib:.0f} GiB", planned(batch)
        cap = (240 if compiled else 120) if self.cuda else 60
        out_json = self.out / "speed" / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            args = cli("bench-step", "--fname", str(ROOT / fname), "--device", "cuda:0" if self.cuda else "cpu",
                       "--steps", str(steps), "--warmup", str(warmup), "--process-group", "--json", str(out_json),
                       *(["--vs-official"] if official else []), *overrides, f"data.batch_size={batch}")
            proc, check = self.run_check("speed", name, args, cap)
            oom = check.status == "FAILED" and proc is not None and \
                re.search(r"out of memory|OutOfMemoryError", proc.output) is not None
            if not (oom and attempt == 0 and batch > 8):
                break
            check.status, check.result = "INFO", f"batch {batch} was out of memory; retrying at {batch // 2}"
            self.report.add(check)
            batch //= 2
            why, plan_total = f"largest that ran: {batch * 2} was out of memory", planned(batch)
        if proc is not None and check.status == "PASS":
            r = json.loads(out_json.read_text())
            compile_s = sum(ms for _, _, ms in r["compiled_at"]) / 1000.0
            peak_gib = r["peak_memory_mb"] / 1024.0
            check.data = {**r, "batch": batch, "batch_why": why, "plan_gib": plan_total["total"] / GIB,
                          "peak_gib": peak_gib, "compile_s": compile_s}
            memory = "peak allocated" if self.cuda else "peak RSS growth"
            check.result = (f"batch {batch} ({why}): {r['images_per_s']:.1f} img/s, step {r['step_ms']:.1f} ms, "
                            f"MFU {100 * r['mfu']:.1f} % of {r['matmul_peak_tflops']:.3g} TFLOP/s; {memory} "
                            f"{memory_text(peak_gib)}, plan {memory_text(plan_total['total'] / GIB)}")
            if compiled:
                check.result += f"; compile {compile_s:.1f} s ({sum(n for _, n, _ in r['compiled_at'])} graphs)"
            if official:
                check.result += f"; {r['speedup_vs_official']:.2f}x the official-style step"
            if (parallel == "ddp" and not ac and not compiled) or label not in self.speed:
                self.speed[label] = dict(check.data, row=name)  # the plain DDP row where there is one
        self.report.add(check)

    # ----------------------------------------------------------------- data
    def part_data(self) -> None:
        cores = os.cpu_count() or 1
        workers = cores if self.cuda else min(cores, 2)
        crop, batch, images, batches = (224, 128, 2048, 10) if self.cuda else (32, 8, 64, 3)
        common = ["--workers", str(workers), "--batch-size", str(batch), "--crop-size", str(crop),
                  "--batches", str(batches), "--per-core-images", "256" if self.cuda else "32"]
        if importlib.util.find_spec("skimage") and importlib.util.find_spec("sklearn"):
            source, args = "real photos 500x375 JPEG", ["--make-photo-shards", str(self.out / "data" / "photos"),
                                                        "--num-images", str(images),
                                                        "--num-shards", str(max(workers, 8))]
        elif "fmnist" in self.shards:
            source, args = "Fashion-MNIST 28 px PNG (not ImageNet-like: install .[dev] for photo shards)", [
                "--shards", self.shards["fmnist"]]
        else:
            self.skip("data", "bench-data", "no shards: needs scikit-image and scikit-learn (.[dev]) or part 3's")
            return
        proc, check = self.run_check("data", f"bench-data, {workers} workers", cli("bench-data", *args, *common), 120)
        if proc is None or check.status != "PASS":
            self.report.add(check)
            return
        summary = last_json_line(proc.output) or {}
        row = max(summary.get("results", [{}]), key=lambda r: r.get("workers", -1))
        if "img_per_s" not in row:
            self.fail(check, "bench-data printed no result line")
            return
        per_core = row.get("pipeline_img_per_cpu_s") or row["decode_transform_img_per_cpu_s"]
        check.data = {"source": source, "workers": workers, "img_per_s": row["img_per_s"],
                      "img_per_cpu_s": per_core, "cores": cores}
        check.result = (f"{row['img_per_s']:.0f} img/s with {workers} workers, {per_core:.0f} img/s per core "
                        f"({source}, crop {crop})")
        self.report.add(check)
        self.compare_loader(row["img_per_s"], per_core, cores)

    def compare_loader(self, loader_img_s: float, per_core: float, cores: int) -> None:
        from .plan import cores_needed

        gpus = max(len(self.env.get("gpus", [])), 1) if self.cuda else 1
        for label, _, _ in self.speed_sizes():
            step = self.speed.get(label)
            if step is None:
                self.skip("data", f"{label}: loader vs step", "no speed row of this size passed")
                continue
            need = step["images_per_s"] * gpus
            per_gpu_cores = cores_needed(step["images_per_s"], per_core)
            limit = "the model" if loader_img_s >= need else "the LOADER"
            self.report.add(Check("data", f"{label}: loader vs step", "INFO", data={
                "step_img_per_s_per_gpu": step["images_per_s"], "gpus": gpus, "loader_img_per_s": loader_img_s,
                "cores_per_gpu_needed": per_gpu_cores, "limit": limit.replace("the ", "").lower()},
                result=f"step ({step['row']}) consumes {step['images_per_s']:.0f} img/s x {gpus} GPU(s), loader gives "
                       f"{loader_img_s:.0f}: {limit} is the limit; {per_gpu_cores:.2f} cores per GPU needed "
                       f"({math.ceil(per_gpu_cores * gpus)} of {cores})"))


def memory_text(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def read_losses(folder: Path) -> list[tuple[int, str]]:
    """(step, loss as logged) of rank 0's CSV; the logged text is the exact float repr."""
    path = Path(folder) / "jepa_r0.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [(int(row["step"]), row["loss"]) for row in csv.DictReader(f)]


def compare_losses(full: list[tuple[int, str]], resumed: list[tuple[int, str]], stop: int, bitwise: bool) -> dict:
    """The resumed run's losses against the uninterrupted run's; before the stop both are plain runs, so
    their difference there is the run-to-run noise of this device."""
    if [s for s, _ in full] != [s for s, _ in resumed] or not full:
        return {"ok": False, "summary": f"steps differ: {len(full)} uninterrupted vs {len(resumed)} resumed"}
    rel = [abs(float(a) - float(b)) / max(abs(float(a)), 1e-12) for (_, a), (_, b) in zip(full, resumed)]
    equal = [a == b for (_, a), (_, b) in zip(full, resumed)]
    before = max((r for (s, _), r in zip(full, rel) if s <= stop), default=0.0)
    after = max((r for (s, _), r in zip(full, rel) if s > stop), default=0.0)
    if all(equal):
        return {"ok": True, "bitwise": True, "max_rel_before": 0.0, "max_rel_after": 0.0, "steps": len(full),
                "summary": f"all {len(full)} losses bitwise equal (stopped at {stop}, resumed)"}
    first = next(s for (s, _), e in zip(full, equal) if not e)
    ok = not bitwise and after <= CUDA_LOSS_RTOL
    return {"ok": ok, "bitwise": False, "first_difference": first, "max_rel_before": before, "max_rel_after": after,
            "steps": len(full),
            "summary": f"not bitwise from step {first}: max relative difference {before:.1e} before the stop at "
                       f"{stop} (run-to-run), {after:.1e} after (tolerance "
                       f"{'0, bitwise' if bitwise else f'{CUDA_LOSS_RTOL:g}'})"}


# ------------------------------------------------------------------------------------------ workers
def probe_environment(device_type: str) -> dict:
    """Versions and devices; which SDPA backends run a bfloat16 forward and backward (float32 on CPU)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"CUDA is not available to torch {torch.__version__} (a CPU build, or no driver)")
        nccl = torch.cuda.nccl.version()
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                    driver=_driver_version(), bf16=torch.cuda.is_bf16_supported(), gpus=[])
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gib": p.total_memory / 2 ** 30,
                                 "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count})
        device, dtype = torch.device("cuda", 0), torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    info["sdpa"] = {}
    for name, backend in backends.items():
        q = torch.randn(2, 4, 64, 64, device=device, dtype=dtype, requires_grad=True)
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q).float().sum().backward()
            info["sdpa"][name] = True
        except (RuntimeError, NotImplementedError):  # "No available kernel" where the backend cannot run it
            info["sdpa"][name] = False
    return info


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else "unknown (nvidia-smi failed)"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def check_process_group(device_type: str, world: int) -> dict:
    """All-reduce and broadcast on `world` ranks, one per GPU (or CPU process), through the local launcher."""
    import functools

    from ..launchers.local import run_ranks

    devices = [f"cuda:{i}" for i in range(world)] if device_type == "cuda" else ["cpu"] * world
    code, value = run_ranks(functools.partial(_process_group_rank), devices, saves_on_stop=False)
    if code != 0 or value is None:
        return {"ok": False, "error": f"the ranks exited {code}"}
    return value


def _process_group_rank(rank: int, world_size: int, device_name: str, *, local_rank: int,
                        cpu_threads: Optional[int], abort_after_s: Optional[float] = None) -> dict:
    import torch
    import torch.distributed as dist

    from ..distributed import env as dist_utils

    device = dist_utils.parse_device(device_name)
    if world_size == 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)
    else:
        dist_utils.init_distributed(rank, world_size, device, local_rank, timeout_s=60)
    with dist_utils.leave_group_after():
        x = torch.full((1 << 20,), float(rank + 1), device=device)
        dist.all_reduce(x)
        want = world_size * (world_size + 1) / 2
        reduce_ok = bool((x == want).all())
        b = torch.arange(1 << 20, device=device, dtype=torch.float32) if rank == 0 else \
            torch.zeros(1 << 20, device=device)
        dist.broadcast(b, src=0)
        broadcast_ok = bool(torch.equal(b, torch.arange(1 << 20, device=device, dtype=torch.float32)))
        busbw = _bus_bandwidth(device, world_size) if world_size > 1 and device.type == "cuda" else None
        oks = [None] * world_size
        dist.all_gather_object(oks, (reduce_ok, broadcast_ok))
        ok = all(a and b for a, b in oks)
        error = "" if ok else f"wrong values on ranks {[i for i, (a, b) in enumerate(oks) if not (a and b)]}"
        return {"ok": ok, "world": world_size, "backend": dist.get_backend(), "all_reduce": [a for a, _ in oks],
                "broadcast": [b for _, b in oks], "busbw_gbs": busbw, "error": error}


def _bus_bandwidth(device, world: int, mib: int = 256) -> float:
    """All-reduce bus bandwidth in GB/s (nccl-tests' definition: 2 (n-1)/n x bytes / time)."""
    import torch
    import torch.distributed as dist

    x = torch.ones(mib * 2 ** 20 // 4, device=device)
    for _ in range(2):
        dist.all_reduce(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dist.all_reduce(x)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000.0 / 5
    return 2 * (world - 1) / world * x.numel() * 4 / seconds / 1e9


def _worker_main(argv: list[str]) -> int:
    what, device_type = argv[0], argv[1]
    if what == "environment":
        result = probe_environment(device_type)
    elif what == "process-group":
        result = check_process_group(device_type, int(argv[2]))
    else:
        raise SystemExit(f"unknown worker {what!r}")
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
