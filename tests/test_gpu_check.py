"""The prepared device script, in its CPU dry-run mode (the GPU run itself needs CUDA)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_writes_one_json_with_tests_syncs_and_bench(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", f"--out={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    assert result["dry_run"] is True and result["facts"]["torch"]
    # Every test marked gpu was collected; without CUDA each one skipped.
    tests = result["tests"]
    assert tests["counts"]["skipped"] >= 6 and tests["counts"]["failed"] == 0
    assert any(o["test"].startswith("tests.test_gpu::") for o in tests["outcomes"])
    assert all(o["outcome"] == "skipped" for o in tests["outcomes"])
    # The sync counter ran every case (nothing to count on a CPU).
    assert {"none/static", "features/mgda", "params/upgrad [auto]"} <= set(result["syncs"])
    bench = result["bench"]
    assert {m["model"] for m in bench["models"]} == {"resnet18", "transformer-base"}
    for model in bench["models"]:
        assert set(model["auto"]) == {"params", "last_shared"}
        assert all(choice["reason"] for choice in model["auto"].values())
    spaces = {case["space"] for case in bench["cases"]}
    assert {"none", "features", "last_shared", "params", "plain", "floor", "libmtl"} <= spaces


def test_gpu_check_without_cuda_and_without_dry_run_refuses(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), f"--out={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "no CUDA device" in done.stderr
    assert "error" in json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
