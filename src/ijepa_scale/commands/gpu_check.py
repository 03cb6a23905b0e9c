"""`ijepa-scale gpu-check`: environment, process group, resume correctness, step speed and memory, data path."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from ..benchmarks.gpu_check import __doc__ as CHECK_DOC, GpuCheck, kill_running


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ijepa-scale gpu-check", description=CHECK_DOC.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(CHECK_DOC.split("\n\n")[1:]))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the GPU checks (default); cpu: the same script at tiny sizes, to test it")
    parser.add_argument("--quick", action="store_true", help="fewer speed rows and steps: about half the time")
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json, gpu_check.md, logs and runs "
                                                           "(default ./gpu_check)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every part's time budget (default 1; e.g. 2 on a slow machine)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.budget_scale <= 0:
        print(f"error: --budget-scale {args.budget_scale:g}: must be positive", file=sys.stderr)
        return 2
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "gpu_check.json").exists())):
        print(f"error: --out {args.out}: exists and is not a gpu-check folder (no gpu_check.json); "
              f"name a new or empty folder", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device cuda: torch {torch.__version__} sees no CUDA GPU here; install a CUDA build "
                  f"of torch (TORCH_SPEC, docs/gpu.md) or run the script's CPU mode with --device cpu",
                  file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    import shutil

    for stale in ("runs", "speed", "logs"):  # an earlier check's runs would be resumed, not rerun
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "knn.csv").unlink(missing_ok=True)
    command = shlex.join(["ijepa-scale", "gpu-check", *(sys.argv[1:] if argv is None else argv)])
    check = GpuCheck(args.device, args.quick, out, args.budget_scale, command)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return check.run()
    except KeyboardInterrupt:
        kill_running()
        check.report.write()
        print(f"gpu-check: interrupted; what finished is in {out}/gpu_check.md", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
