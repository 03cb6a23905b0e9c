"""`bash launch/gpu_check.sh --device cpu --quick`: the GPU check script's CPU mode runs every part and passes."""

import json
import os
import subprocess
import sys

import pytest

from tests.integration.common import ROOT, child_env

pytestmark = pytest.mark.integration


def test_cpu_mode_runs_every_part_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "gc"
    # --budget-scale: a loaded CI machine must not cut checks for time; this tests the script, not speed.
    env = dict(child_env(), IJEPA_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out",
                           str(out), "--budget-scale", "4"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every part passed" in proc.stdout
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["finished"] is True and doc["mode"] == "cpu quick"
    assert {part: p["status"] for part, p in doc["parts"].items()} == dict.fromkeys(
        ("environment", "process_group", "correctness", "speed", "data"), "PASS")
    checks = {c["name"]: c for c in doc["checks"]}
    assert all(c["status"] in ("PASS", "INFO") for c in doc["checks"] if c["name"] != "compile on and off")
    assert checks["gloo world 1"]["data"]["ok"] and checks["gloo world 2"]["data"]["world"] == 2
    resume = checks["resumed losses vs uninterrupted"]["data"]
    assert resume["bitwise"] is True and resume["steps"] == 20
    assert 0.0 <= float(checks["eval knn"]["data"]["accuracy"]) <= 1.0
    speed = [c for c in doc["checks"] if c["part"] == "speed" and c["status"] == "PASS"]
    assert {c["name"] for c in speed} == {"tiny/8 DDP-of-one", "tiny/16 FSDP-of-one +AC vs official"}
    for c in speed:
        assert c["data"]["images_per_s"] > 0 and c["data"]["plan_gib"] > 0 and set(c["data"]["phases_ms"]) == {
            "target_fwd", "context_fwd", "predictor", "backward", "optimizer", "ema"}
    assert checks["tiny/16 FSDP-of-one +AC vs official"]["data"]["speedup_vs_official"] > 0
    assert checks["tiny/8: loader vs step"]["data"]["cores_per_gpu_needed"] > 0
    md = (out / "gpu_check.md").read_text()
    for part in ("environment", "process_group", "correctness", "speed", "data"):
        assert f"| {part} | PASS |" in md
    assert "## Speed and memory" in md and "bitwise equal" in md
    # Every check left its log.
    assert all((out / c["log"]).exists() for c in doc["checks"] if c["log"])
    assert os.path.exists(out / "runs" / "resumed" / "jepa_r0.csv")
