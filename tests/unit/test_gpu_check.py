"""gpu-check's own machinery: isolated checks, causes, budgets, the incremental report, the loss comparison."""

import json
import os
import sys
import time

import pytest
import torch

from ijepa_scale.benchmarks import gpu_check
from ijepa_scale.benchmarks.gpu_check import Check, GpuCheck, compare_losses
from ijepa_scale.commands import gpu_check as gpu_check_command


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


class Faulty(GpuCheck):
    """Each part meets another kind of failure; the last one passes."""

    def part_environment(self):
        _, check = self.run_check("environment", "segfault", py("import os, signal; os.kill(os.getpid(), "
                                                                 "signal.SIGSEGV)"), 30)
        self.report.add(check)

    def part_process_group(self):
        code = ("print('loading'); print('Traceback (most recent call last):'); "
                "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB'); "
                "print('During handling of the above exception, another exception occurred:'); "
                "raise SystemExit('RuntimeError: follow-up')")
        _, check = self.run_check("process_group", "out of memory", py(code), 30)
        self.report.add(check)

    def part_correctness(self):
        pidfile = self.out / "grandchild.pid"
        _, check = self.run_check("correctness", "hangs", ["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], 2)
        self.report.add(check)
        self.grandchild = int(pidfile.read_text())

    def part_speed(self):
        raise KeyError("a bug in the part")

    def part_data(self):
        _, check = self.run_check("data", "fine", py("print('ok')"), 30)
        self.report.add(check)


def test_a_crash_an_oom_a_hang_and_a_bug_fail_their_checks_and_the_rest_still_runs(tmp_path, capsys):
    faulty = Faulty("cpu", True, tmp_path, 1.0, "test")
    start = time.monotonic()
    assert faulty.run() == 1
    assert time.monotonic() - start < 30  # the hang was cut at its 2 s cap
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["finished"] is True
    by_name = {c["name"]: c for c in doc["checks"]}
    crash = by_name["segfault"]
    assert crash["status"] == "FAILED" and ("SIGSEGV" in crash["cause"] or "Segmentation fault" in crash["cause"])
    assert by_name["out of memory"]["cause"].startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert by_name["hangs"]["cause"] == "timed out after 2 s (its share of the budget)"
    assert by_name["(part)"]["cause"] == "KeyError: 'a bug in the part'"
    assert by_name["fine"]["status"] == "PASS"
    assert {p: s["status"] for p, s in doc["parts"].items()} == {
        "environment": "FAILED", "process_group": "FAILED", "correctness": "FAILED", "speed": "FAILED",
        "data": "PASS"}
    # The hung command's own children went with it.
    time.sleep(0.5)
    stat = f"/proc/{faulty.grandchild}/stat"
    assert not os.path.exists(stat) or open(stat).read().split(")")[1].split()[0] in ("Z", "X")
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Failures" in md and "logs/correctness-hangs.log" in md
    out = capsys.readouterr().out
    assert "FAILED: environment, process_group, correctness, speed" in out


def test_checks_past_the_budget_are_skipped_and_an_unfinished_report_says_so(tmp_path):
    check = GpuCheck("cpu", True, tmp_path, 0.01, "test")  # every part gets a fraction of a second
    proc, row = check.run_check("speed", "late", py("print(1)"), 60)
    assert proc is None and row.status == "SKIPPED" and row.result.startswith("out of time")
    check.report.add(Check("environment", "one", "PASS", result="first"))
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["finished"] is False and doc["checks"][0]["result"] == "first"
    assert "NOT finished" in (tmp_path / "gpu_check.md").read_text()


def test_resumed_losses_must_be_bitwise_on_cpu_and_within_tolerance_on_cuda():
    full = [(1, "0.5"), (2, "0.4"), (3, "0.3")]
    assert compare_losses(full, list(full), 1, bitwise=True)["bitwise"] is True
    close = [(1, "0.5"), (2, "0.40001"), (3, "0.30002")]
    assert compare_losses(full, close, 1, bitwise=True)["ok"] is False
    r = compare_losses(full, close, 1, bitwise=False)
    assert r["ok"] is True and r["first_difference"] == 2 and r["max_rel_before"] == 0.0
    assert compare_losses(full, [(1, "0.5"), (2, "0.5"), (3, "0.3")], 1, bitwise=False)["ok"] is False
    assert compare_losses(full, full[:2], 1, bitwise=False)["summary"].startswith("steps differ")


def test_gpu_check_refuses_a_foreign_out_folder_and_cuda_without_a_gpu(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("x")
    assert gpu_check_command.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "not a gpu-check folder" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").exists()
    if not torch.cuda.is_available():
        assert gpu_check_command.main(["--out", str(tmp_path / "new")]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_environment_worker_reports_versions_and_sdpa_backends():
    info = gpu_check.probe_environment("cpu")
    assert info["torch"] == torch.__version__ and info["sdpa"]["math"] is True
    assert set(info["sdpa"]) == {"flash", "memory-efficient", "cudnn", "math"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_environment_worker_on_cuda():
    info = gpu_check.probe_environment("cuda")
    assert info["gpus"] and info["cuda"] and info["nccl"] and info["cudnn"]


FAKE_BENCH_STEP = """
import json, sys
args = sys.argv[1:]
batch = int([a for a in args if a.startswith("data.batch_size=")][-1].split("=")[1])
if batch > 64:
    print("Traceback (most recent call last):")
    sys.exit("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB")
path = args[args.index("--json") + 1]
json.dump({"images_per_s": 3.0 * batch, "step_ms": 100.0, "mfu": 0.4, "matmul_peak_tflops": 700.0,
           "peak_memory_mb": 20480.0, "compiled_at": [[1, 3, 60000.0]], "phases_ms": {"backward": 50.0},
           "batch_seen": batch}, open(path, "w"))
"""


def test_speed_rows_on_cuda_pick_the_batch_plan_fits_and_retry_half_after_out_of_memory(tmp_path, monkeypatch):
    # The CUDA path of the speed part, with bench-step replaced by a stand-in that runs out of memory above 64.
    monkeypatch.setattr(gpu_check, "cli", lambda *args: [sys.executable, "-c", FAKE_BENCH_STEP, *args[1:]])
    check = GpuCheck("cuda", False, tmp_path, 1.0, "test")
    sizes = check.speed_sizes()
    check.speed_row(sizes, (0, "ddp", False, True, False), 2, 1, 80.0)  # ViT-H/14, compile on
    oom, done = check.report.checks
    assert oom.status == "INFO" and oom.result == "batch 128 was out of memory; retrying at 64"
    assert done.status == "PASS" and done.data["batch"] == 64 and done.data["batch_seen"] == 64
    assert done.data["batch_why"] == "largest that ran: 128 was out of memory"
    assert done.data["compile_s"] == 60.0 and "compile 60.0 s (3 graphs)" in done.result
    assert 0 < done.data["plan_gib"] < 37  # plan's DDP estimate at batch 64, not 128
    # With 24 GiB, plan's estimate (plus its margin) picks a smaller batch before anything runs.
    check.speed_row(sizes, (0, "ddp", False, False, False), 2, 1, 24.0)
    small = check.report.checks[-1]
    assert small.status == "PASS" and small.data["batch"] < 64 and small.data["batch_why"] == \
        "largest plan fits in 24 GiB"
    assert check.speed["ViT-H/14"]["row"] == "ViT-H/14 DDP-of-one"
