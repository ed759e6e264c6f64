"""KV dtype auto vs int8 at the same memory budget, same workload, one run.

Workload: N requests of ~P prompt + O output tokens, all submitted at once (ignore_eos).
Reported per KV dtype: blocks in the budget, the most requests running at once, preemptions,
output tokens/s.

    python benchmarks/kv_quant_capacity.py                       # 128 x (256 + 256), 512 MiB
    python benchmarks/kv_quant_capacity.py --quick
    python benchmarks/kv_quant_capacity.py --num-requests 32 --kv-cache-memory 1GiB --repeat 3

--repeat N runs the workload N times per dtype, alternating the two engines (built once), and
reports the median tokens/s of each and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from kvserve import LLM, SamplingParams


def build(kv_cache_dtype: str, args) -> LLM:
    return LLM(
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=kv_cache_dtype,
        max_num_seqs=args.num_requests,
        enable_prefix_caching=False,
    )


def run(llm: LLM, kv_cache_dtype: str, args) -> dict:
    engine = llm.engine
    preemptions_before = engine.scheduler.num_preemptions
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    for prompt in prompts:
        engine.add_request(prompt, params)
    max_running = 0
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        deltas = engine.step()
        max_running = max(max_running, len(engine.scheduler.running))
        generated += sum(len(d.token_ids) for d in deltas)
        for d in deltas:
            if d.finish_reason is not None:
                engine.pop_finished(d.request_id)
    elapsed = time.perf_counter() - start
    engine.check_idle()
    return {
        "kv_cache_dtype": kv_cache_dtype,
        "num_blocks": engine.kv.pool.num_blocks,
        "max_running": max_running,
        "preemptions": engine.scheduler.num_preemptions - preemptions_before,
        "output_tokens_per_s": generated / elapsed,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--repeat", type=int, default=1, help="runs per dtype, interleaved; medians")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.prompt_len, args.output_len, args.kv_cache_memory = 16, 64, 32, "24MiB"
    llms = {dtype: build(dtype, args) for dtype in ("auto", "int8")}
    rounds = [[run(llm, dtype, args) for dtype, llm in llms.items()] for _ in range(args.repeat)]
    results = [
        {**runs[len(runs) // 2], "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in runs)}
        for runs in zip(*rounds)
    ]
    ratios = [i8["output_tokens_per_s"] / full["output_tokens_per_s"] for full, i8 in rounds]
    print(
        f"\n{args.num_requests} requests x ({args.prompt_len} + {args.output_len}) tokens, KV budget {args.kv_cache_memory}"
    )
    print(f"{'KV dtype':10s} {'blocks':>7s} {'max running':>12s} {'preemptions':>12s} {'out tok/s':>10s}")
    for r in results:
        print(
            f"{r['kv_cache_dtype']:10s} {r['num_blocks']:7d} {r['max_running']:12d} {r['preemptions']:12d} "
            f"{r['output_tokens_per_s']:10.1f}"
        )
    full, int8 = results
    print(
        f"\nint8 / auto: {int8['max_running'] / full['max_running']:.2f}x concurrent requests, "
        f"{int8['output_tokens_per_s'] / full['output_tokens_per_s']:.2f}x output tokens/s "
        f"(medians of {args.repeat} interleaved runs; per-round ratios {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "rounds": rounds, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
