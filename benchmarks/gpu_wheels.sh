#!/usr/bin/env bash
# Fetch into .whl/ the wheels that benchmarks/gpu_check.sh installs (without an index) on a
# device whose Python 3.12 image lacks them: pydantic and its own needs, and TorchJD for the
# comparison. Run on a machine that reaches PyPI, from anywhere in the repository; then carry
# .whl to the device (it is ignored by git: add `/.whl/` to .git/info/exclude).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$ROOT/.whl"
for spec in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 torchjd==0.18.0; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$ROOT/.whl" "$spec"
done
ls -l "$ROOT/.whl"
