#!/usr/bin/env bash
# One call that exercises every GPU path: the CUDA-marked tests, then bench/gpu_check.py's table
# (exact SDM vs SciPy, distance metrics vs MONAI, 2-epoch default runs in bf16 and fp16, a DDP run
# over NCCL, the default run's wall time, prediction of a 4096² and an 8192² scene plain and gated,
# a 16384² GeoTIFF and JPEG 2000, training steps/s). Exit status: 0 all passed, 1 a test or check
# failed or missed its goal, 3 no CUDA device (nothing was checked: a CPU never passes this).
#
#   bash bench/gpu_check.sh              # uses cuda:0
#   bash bench/gpu_check.sh --device cuda:1
#   PYTHON=/path/to/python bash bench/gpu_check.sh    # default: python3 (a virtual environment's), else python
set -uo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device is available to torch {torch.__version__} "
          f"(CUDA build: {torch.version.cuda or 'none, a CPU-only wheel'}); nothing was checked. "
          "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
    sys.exit(3)
PY
status=$?
if [ "$status" -ne 0 ]; then
    exit "$status"
fi
start=$(date +%s)
echo "== CUDA-marked tests"
"$PYTHON" -m pytest -m cuda -rs -q
tests=$?
echo "== checks"
"$PYTHON" bench/gpu_check.py "$@"
checks=$?
echo "== tests exit $tests, checks exit $checks, $(( $(date +%s) - start )) s in all"
if [ "$tests" -ne 0 ] || [ "$checks" -ne 0 ]; then
    exit 1
fi
