#!/usr/bin/env bash
# The GPU check, one prepared run on a CUDA machine (an H100/H200 with ~16 cores), under 8
# minutes: the wheels carried in .whl/ are installed, the test suite runs on CUDA (test_cuda.py
# first, then the rest), then benchmarks/gpu_bench.py: the decoder candidates (nvImageCodec,
# torchvision's nvJPEG, cpu, hybrid), the encoder runtimes (eager, torch.compile; TensorRT where
# installed) and issue 19's targets. Logs and the benchmark's JSON go to $OUT (default
# /tmp/omni-gpu). Budget: install and checks ~20 s, tests <= TEST_TIMEOUT (170 s), benchmark
# <= BENCH_TIMEOUT (270 s; it starts no run after 200 s and prints the targets before the
# candidate runs); each part is cut at its limit and what it printed is kept.
#
# Wheels the image lacks travel in .whl/ (ignored by git; with the 64 MiB working-tree limit in
# mind). Chosen: nvImageCodec and the nvJPEG library it loads (29 MiB together), and the
# HEIC and RAW decoders the format tests need (9 MiB), from the repo root:
#   W="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#      --platform manylinux2014_x86_64 -d .whl"
#   python3 -m pip download $W nvidia-nvimgcodec-cu13==0.9.0.20   # 25 MB
#   python3 -m pip download $W nvidia-nvjpeg==13.0.4.44           # 4 MB (CUDA 13.0, as torch)
#   python3 -m pip download $W pillow-heif==1.8.1 rawpy==0.28.0   # 9 MB: HEIC and RAW tests
# Not carried: onnxruntime-gpu (~300 MB) and torch-tensorrt + tensorrt (GBs) are far over the
# limit, so the `tensorrt` runtime is prepared (model/runtimes.py) but not measured here; the
# image's onnxruntime is CPU-only. bitsandbytes (int8/nf4) may be added as before:
#   python3 -m pip download $W --platform manylinux_2_24_x86_64 bitsandbytes==0.50.2
# Run it: device run with carry [".whl"] and command `bash benchmarks/gpu_check.sh`,
# timeout_s 540. TESTS=... and BENCH_ARGS=... narrow a rerun.
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
    python3 -c "
import torch
from omni_cli.inputs.devdecode import BACKENDS, device_decoder
from omni_cli.model.runtimes import installed
d = torch.device('cuda')
print('device JPEG decoders:', {b: device_decoder(d, b) is not None for b in BACKENDS})
print('encoder runtimes on cuda:', installed(d))
try:
    from nvidia import nvimgcodec
    print('nvimgcodec', nvimgcodec.__version__, 'cuda', nvimgcodec.__cuda_version__)
except Exception as exc:
    print('nvimgcodec not importable:', type(exc).__name__, exc)
"
} 2>&1 | tee "$OUT/env.txt"
PARALLEL=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist, if there
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -p no:cacheprovider -rfEs $PARALLEL \
    ${TESTS:-tests/test_cuda.py tests} 2>&1 | tee "$OUT/tests.log" | tail -40
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-270}" python3 benchmarks/gpu_bench.py --json "$OUT/gpu.json" \
    --deadline 200 ${BENCH_ARGS:-} "$@" 2>&1 | tee "$OUT/bench.log"
