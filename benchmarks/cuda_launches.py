"""Why a CUDA decode step costs what it does: step time at batch 1 and 32, and torch.profiler's count of
kernel launches and CPU against GPU time over a short generation (the default model, bf16).

    python benchmarks/cuda_launches.py        # benchmarks/gpu_check.sh runs it

First run (H200, 2026-12-04, benchmarks/README.md "On a CUDA GPU"): 22-30 ms a step at batch 1 and at
batch 32 alike; 19,969 cudaLaunchKernel calls over 17 forwards (~1,200 a forward); 42 ms of GPU time
against 358 ms of CPU time: launch-bound.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvserve import LLM, SamplingParams


def main() -> None:
    llm = LLM(device="cuda", kv_cache_memory="1GiB")
    ids = list(range(1000, 1128))
    for n in (1, 1, 32):  # the first batch-1 run warms up
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        outs = llm.generate([ids[i:] + ids[:i] for i in range(n)], params, use_tqdm=False)
        m = outs[0].metrics
        print(f"batch {n}: decode step {(m.finish_time - m.first_token_time) / 63 * 1e3:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate([ids], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    start = time.perf_counter()
    sum(range(10**7))
    print(f"host speed: Python's sum(range(10**7)) {time.perf_counter() - start:.3f} s; torch {torch.__version__}")


if __name__ == "__main__":
    main()
