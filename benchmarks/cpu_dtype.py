"""float32 vs bfloat16 weights and KV on the CPU, one run: prefill and decode tokens/s.

Whether bfloat16 pays on a CPU depends on the CPU: with native bf16 units (AVX512-BF16, AMX) its
matrix products run several times faster than fp32; without them (e.g. Zen 3, AVX2 only, the
machine of ../shared/PEERS.md) torch's bf16 products are ~300x slower and this is unusable. Since
the compiled kernels (issue 15) serve fp32 only, fp32 is the faster engine setting even with bf16
units: prefill about even, decode 1.3-2.9x faster (benchmarks/README.md, 2026-12-04).

    python benchmarks/cpu_dtype.py [--prompts 8] [--prompt-len 512]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from kvserve import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--streams", type=int, default=4, help="requests decoding together")
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()

    x = torch.randn(256, 576)
    w = torch.randn(3072, 576)
    for dtype in (torch.float32, torch.bfloat16):
        xs, ws = x.to(dtype), w.to(dtype)
        torch.nn.functional.linear(xs, ws)
        start = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.linear(xs, ws)
        gflops = 10 * 2 * 256 * 576 * 3072 / (time.perf_counter() - start) / 1e9
        print(f"matrix product [256, 576] x [576, 3072] in {dtype}: {gflops:.0f} GFLOP/s")

    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    greedy = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for dtype in ("float32", "bfloat16"):
        llm = LLM(dtype=dtype, kv_cache_memory="1GiB")
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        prefill = args.prompts * args.prompt_len / (time.perf_counter() - start)
        llm.engine.kv.pool.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate(prompts[: args.streams], greedy, use_tqdm=False)
        decode = args.streams * args.output_len / (time.perf_counter() - start)
        print(
            f"{dtype:9s} prefill {prefill:7.0f} tok/s, {args.streams} streams x {args.output_len} "
            f"(prompt included) {decode:6.1f} output tok/s"
        )
        del llm


if __name__ == "__main__":
    main()
