#!/usr/bin/env bash
# The prepared GPU check (issue 17): facts about the device, every `pytest -m gpu` test, the
# `mtlhooks bench` gpu suite on CUDA and the host syncs per backward(), written to one JSON file.
#
#   bash benchmarks/gpu_check.sh                  # on a CUDA machine: about 3 minutes
#   bash benchmarks/gpu_check.sh --dry-run        # on a CPU: the same flow at toy sizes
#   bash benchmarks/gpu_check.sh --out=DIR        # where gpu_check.json goes ($OUT, else ./gpu-check)
#
# It installs nothing it cannot find: a Python module that is missing (the device image has
# torch, pytest, hypothesis, pluggy and PyYAML but no pydantic) is installed only from wheels
# in .whl/ at the repository root, with pip --no-index; `bash benchmarks/gpu_wheels.sh` fetches
# them on a machine that reaches PyPI. Exit status: 0 when every test passed and the bench ran.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$PWD/gpu-check}
DRY=()
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=(--dry-run) ;;
        --out=*) OUT_DIR=${arg#--out=} ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --dry-run, --out=DIR)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"

missing=$("$PY" - <<'PYEOF'
import importlib.util
needed = ["torch", "pydantic", "pluggy", "yaml", "pytest", "hypothesis"]
print(" ".join(m for m in needed if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    if [[ " $missing " == *" torch "* ]]; then
        echo "gpu_check.sh: $PY has no torch; set PYTHON to the interpreter that has it" >&2
        exit 3
    fi
    if ! compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        echo "gpu_check.sh: missing Python modules: $missing, and no wheels in $ROOT/.whl;" \
            "run 'bash benchmarks/gpu_wheels.sh' where PyPI is reachable and carry .whl" >&2
        exit 3
    fi
    echo "gpu_check.sh: installing $missing from $ROOT/.whl (no index)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mtlhooks-site "$ROOT"/.whl/*.whl || exit 3
    export PYTHONPATH=/tmp/mtlhooks-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
cd "$ROOT" && exec "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "${DRY[@]}"
