"""Driver of ``benchmarks/gpu_check.sh``: one JSON file with the device's facts, the outcome of
every ``pytest -m gpu`` test, the ``mtlhooks bench`` gpu suite on CUDA and the host syncs per
``backward()`` in each space.

Run it through the shell script (which puts the repository and any carried wheels on the
path). ``--dry-run`` runs the same flow on the CPU at toy sizes: the tests all skip, the bench
runs each model once, and no sync can be counted; it is what the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TEST_TIMEOUT_S = 150
"""The GPU tests take well under a minute on an H100/H200; this stops a hung test."""


def facts() -> dict[str, Any]:
    found: dict[str, Any] = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found.update(
            device=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            memory_gib=round(properties.total_memory / 2**30, 1),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return found


def gpu_tests(out: Path) -> dict[str, Any]:
    """Every test marked ``gpu`` in tests/, with per-test outcomes from pytest's JUnit XML."""
    report = out / "gpu-tests.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfEs",
        f"--junitxml={report}",
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=TEST_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stdout or b"")[-4000:]
        return {"error": f"timed out after {TEST_TIMEOUT_S} s", "output_tail": str(tail)}
    outcomes = []
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    if report.exists():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome, message = "passed", None
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
                    message = (child.get("message") or "")[:500]
            counts[outcome] += 1
            outcomes.append(
                {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome}
                | ({"message": message} if message and outcome != "passed" else {})
            )
    return {
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "counts": counts,
        "outcomes": outcomes,
        "output_tail": done.stdout[-3000:] + done.stderr[-2000:],
    }


def sync_counts(device: torch.device) -> dict[str, Any]:
    """Device→host synchronisations in one ``mtl.backward()`` of each bench case, counted with
    ``torch.cuda.set_sync_debug_mode("warn")`` on a small MLP (after a warm-up call). On the
    CPU the calls run but nothing can be counted (``syncs`` is None)."""
    from mtlhooks import bench

    cases = (*bench.CASES, ("params", "upgrad", "auto"))
    return {bench._key(*case): _count_syncs(device, *case) for case in cases}


def _count_syncs(device: torch.device, space: str, method: str, mode: str) -> dict[str, Any]:
    from mtlhooks import MTL, bench

    counting = device.type == "cuda"
    torch.manual_seed(0)
    names = ["t0", "t1", "t2"]
    model = bench.MODELS["mlp"].build(len(names)).to(device)
    x = torch.randn(64, 256, device=device)
    config = bench.case_config(names, space, method, mode)
    mtl = MTL(config, shared=model.encoder).to(device=device)

    def call() -> None:
        z, outputs = model(x)
        losses = {n: out.pow(2).mean() for n, out in zip(names, outputs)}
        mtl.backward(losses, features=z if mtl.space.value == "features" else None)

    call()
    if counting:
        torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if counting:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            if counting:
                torch.cuda.set_sync_debug_mode("default")
    mtl.close()
    # Where each sync was called from (the Python line that ran the synchronising op).
    where = [
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    ]
    return {"syncs": len(where) if counting else None, "where": where}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="the same flow on a CPU")
    parser.add_argument("--repeats", type=int, default=None, help="bench rounds (default 20)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"dry_run": args.dry_run, "facts": facts()}
    if not args.dry_run and not torch.cuda.is_available():
        result["error"] = "no CUDA device: run with --dry-run to test this script on a CPU"
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(result["error"], file=sys.stderr)
        return 1
    device = torch.device("cpu" if args.dry_run else "cuda")

    print("== GPU tests (pytest -m gpu)", flush=True)
    result["tests"] = tests = gpu_tests(out)
    print(json.dumps(tests.get("counts", tests), indent=None), flush=True)

    print("== host syncs per backward()", flush=True)
    try:
        result["syncs"] = sync_counts(device)
    except Exception:  # recorded in the JSON: the bench still runs
        result["syncs"] = {"error": traceback.format_exc(limit=5)}
    print(json.dumps(result["syncs"], indent=None)[:2000], flush=True)

    print("== mtlhooks bench, gpu suite", flush=True)
    from mtlhooks import bench

    start = time.perf_counter()
    try:
        measured = bench.run(suite="gpu", device=device, dry_run=args.dry_run, repeats=args.repeats)
        measured["seconds"] = round(time.perf_counter() - start, 1)
        result["bench"] = measured
        print(bench.format_table(measured), flush=True)
    except Exception:  # recorded in the JSON
        result["bench"] = {"error": traceback.format_exc(limit=8)}
        print(result["bench"]["error"], file=sys.stderr)

    result["seconds"] = round(time.perf_counter() - started, 1)
    path = out / "gpu_check.json"
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"== wrote {path} ({result['seconds']} s)")
    tests_ok = tests.get("returncode") in (0, 5) and not tests.get("counts", {}).get("failed")
    tests_ok = tests_ok and not tests.get("counts", {}).get("error")
    return 0 if tests_ok and "error" not in result["bench"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
