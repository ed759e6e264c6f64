"""KV dtype auto vs int8 at the same memory budget, same workload, one run.

Workload: N requests of ~P prompt + O output tokens, all submitted at once (ignore_eos).
Reported per KV dtype: blocks in the budget, the most requests running at once, preemptions,
output tokens/s.

    python benchmarks/kv_quant_capacity.py                       # 128 x (256 + 256), 512 MiB
    python benchmarks/kv_quant_capacity.py --quick
    python benchmarks/kv_quant_capacity.py --num-requests 32 --kv-cache-memory 1GiB --repeat 3

--repeat N runs the workload N times per dtype, alternating the engines (built once), and
reports the median tokens/s of each and the median of the per-round ratios. --plain-int8 adds a third
engine, int8 without kvserve's compiled CPU kernels (KVSERVE_CPU_KERNELS=0 while it runs); --fp8 adds
fp8 (CUDA only: `--device cuda --fp8`, what benchmarks/gpu_check.sh runs).
"""

from __future__ import annotations

import argparse
import json
import os
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
        device=args.device,
    )


def run(llm: LLM, name: str, args) -> dict:
    os.environ["KVSERVE_CPU_KERNELS"] = "0" if name == "int8-plain" else "1"  # read at every attention call
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
        "kv_cache_dtype": name,
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
    parser.add_argument("--plain-int8", action="store_true", help="also int8 without the compiled kernels")
    parser.add_argument("--fp8", action="store_true", help="also fp8 (CUDA only)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.prompt_len, args.output_len, args.kv_cache_memory = 16, 64, 32, "24MiB"
    names = ["auto", "int8"] + (["int8-plain"] if args.plain_int8 else []) + (["fp8"] if args.fp8 else [])
    llms = {name: build(name.removesuffix("-plain"), args) for name in names}
    rounds = [[run(llm, name, args) for name, llm in llms.items()] for _ in range(args.repeat)]
    results = [
        {**runs[len(runs) // 2], "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in runs)}
        for runs in zip(*rounds)
    ]
    ratios = [runs[1]["output_tokens_per_s"] / runs[0]["output_tokens_per_s"] for runs in rounds]
    print(
        f"\n{args.num_requests} requests x ({args.prompt_len} + {args.output_len}) tokens, KV budget {args.kv_cache_memory}"
    )
    print(f"{'KV dtype':10s} {'blocks':>7s} {'max running':>12s} {'preemptions':>12s} {'out tok/s':>10s}")
    for r in results:
        print(
            f"{r['kv_cache_dtype']:10s} {r['num_blocks']:7d} {r['max_running']:12d} {r['preemptions']:12d} "
            f"{r['output_tokens_per_s']:10.1f}"
        )
    full, int8 = results[:2]
    print(
        f"\nint8 / auto: {int8['max_running'] / full['max_running']:.2f}x concurrent requests, "
        f"{int8['output_tokens_per_s'] / full['output_tokens_per_s']:.2f}x output tokens/s "
        f"(medians of {args.repeat} interleaved runs; per-round ratios {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    for index, name in enumerate(names[2:], start=2):
        extra = [runs[index]["output_tokens_per_s"] / runs[0]["output_tokens_per_s"] for runs in rounds]
        running = results[index]["max_running"] / full["max_running"]
        print(
            f"{name} / auto: {running:.2f}x concurrent requests, per-round tok/s {', '.join(f'{r:.2f}' for r in extra)}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "rounds": rounds, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
