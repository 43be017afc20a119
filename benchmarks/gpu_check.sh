#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine (an H100/H200 with ~16 cores): the test suite on
# CUDA, then benchmarks/gpu_bench.py. Logs and the benchmark's JSON go to $OUT (default
# /tmp/omni-gpu). Wheels in .whl/ (bitsandbytes, for int8/nf4) are installed first if present:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# Under 6 minutes on one H200: tests ~1.5 min (8 processes), benchmark ~3 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/omni-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/omni-site .whl/*.whl && export PYTHONPATH=/tmp/omni-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc
    python3 -c "import torch, torchvision, transformers, pyarrow; print('torch', torch.__version__,
'torchvision', torchvision.__version__, 'transformers', transformers.__version__,
'pyarrow', pyarrow.__version__)"
} 2>&1 | tee "$OUT/env.txt"
PARALLEL=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist, if there
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -rfEs $PARALLEL ${TESTS:-tests} 2>&1 \
    | tee "$OUT/tests.log" | tail -40
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu_bench.py --json "$OUT/gpu.json" "$@" 2>&1 \
    | tee "$OUT/bench.log"
