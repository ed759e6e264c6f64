"""Prefix caching on vs off, in one run, on the engine (no HTTP in the way).

Shared-prefix workload: N requests, each a ~1,000-token shared system prompt plus ~50 distinct
tokens, 32 output tokens, at most C in flight (a new request is submitted as one finishes).
Reported for caching off and on: prefill tokens actually computed, TTFT p50/p99 (submission to
first token) and output tokens/s. A no-shared-prefix workload measures what caching costs when
nothing is shared.

    python benchmarks/prefix_caching.py            # full run (a few minutes on 2 cores)
    python benchmarks/prefix_caching.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from kvserve import LLM, SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))


def words() -> list[str]:
    with open(os.path.join(HERE, "words.txt")) as f:
        return f.read().split()


def text_tokens(llm: LLM, rng: random.Random, count: int) -> list[int]:
    vocab = words()
    ids: list[int] = []
    while len(ids) < count:
        ids += llm.tokenizer.encode(" " + " ".join(rng.choice(vocab) for _ in range(64)))
    return ids[:count]


def run_workload(llm: LLM, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    before = llm.get_stats()
    pending = list(prompts)
    submitted: dict[str, float] = {}
    ttft: list[float] = []
    generated = 0
    start = time.perf_counter()
    while pending or submitted:
        while pending and len(submitted) < concurrency:
            request_id = engine.add_request(pending.pop(0), params)
            submitted[request_id] = time.perf_counter()
        for delta in engine.step():
            generated += len(delta.token_ids)
            if delta.request_id in submitted and engine.groups[delta.request_id].sequences[0].num_output_tokens == len(
                delta.token_ids
            ):
                ttft.append(time.perf_counter() - submitted[delta.request_id])
            if delta.finish_reason is not None:
                engine.pop_finished(delta.request_id)
                del submitted[delta.request_id]
    elapsed = time.perf_counter() - start
    after = llm.get_stats()
    engine.check_idle()
    ttft.sort()
    return {
        "prefill_tokens_computed": after["num_computed_prefill_tokens"] - before["num_computed_prefill_tokens"],
        "prefix_cache_hit_tokens": after["prefix_cache_hits"] - before["prefix_cache_hits"],
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "output_tokens_per_s": generated / elapsed,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--shared-len", type=int, default=1000)
    parser.add_argument("--distinct-len", type=int, default=50)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-shared-len", type=int, default=256, help="prompt length of the no-sharing workload")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.shared_len, args.concurrency, args.no_shared_len = 8, 200, 4, 64

    rng = random.Random(0)
    llms = {
        "off": LLM(kv_cache_memory="1GiB", enable_prefix_caching=False),
        "on": LLM(kv_cache_memory="1GiB", enable_prefix_caching=True),
    }
    base = llms["on"]
    system = text_tokens(base, rng, args.shared_len)
    shared = [system + text_tokens(base, rng, args.distinct_len) for _ in range(args.num_requests)]
    distinct = [text_tokens(base, rng, args.no_shared_len) for _ in range(args.num_requests)]
    warm = [text_tokens(base, rng, 32)]
    results = {}
    for name, llm in llms.items():
        llm.generate(warm, SamplingParams(max_tokens=2), use_tqdm=False)
        results[f"shared/{name}"] = run_workload(llm, shared, args.output_len, args.concurrency)
        results[f"no-shared/{name}"] = run_workload(llm, distinct, args.output_len, args.concurrency)

    print(
        f"\nshared prefix: {args.num_requests} requests x ({args.shared_len} shared + {args.distinct_len} distinct) "
        f"tokens, {args.output_len} out, concurrency {args.concurrency}"
    )
    header = f"{'run':18s} {'prefill computed':>16s} {'hits':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'out tok/s':>10s}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:18s} {r['prefill_tokens_computed']:16d} {r['prefix_cache_hit_tokens']:8d} "
            f"{r['ttft_p50_s']:9.3f} {r['ttft_p99_s']:9.3f} {r['output_tokens_per_s']:10.1f}"
        )
    off, on = results["shared/off"], results["shared/on"]
    print(
        f"\nprefill tokens computed: {off['prefill_tokens_computed'] / max(1, on['prefill_tokens_computed']):.1f}x fewer"
    )
    print(
        f"TTFT p50: {off['ttft_p50_s'] / on['ttft_p50_s']:.1f}x lower; p99 {off['ttft_p99_s'] / on['ttft_p99_s']:.1f}x"
    )
    cost = 1 - results["no-shared/on"]["output_tokens_per_s"] / results["no-shared/off"]["output_tokens_per_s"]
    print(f"no shared prefix: caching on costs {100 * cost:.1f}% throughput")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
