"""Prefix caching on vs off, in one run, on the engine (no HTTP in the way).

Shared-prefix workload: N requests, each a ~1,000-token shared system prompt plus ~50 distinct
tokens, 32 output tokens, at most C in flight (a new request is submitted as one finishes).
Reported for caching off and on: prefill tokens actually computed, TTFT p50/p99 (submission to
first token) and output tokens/s. A no-shared-prefix workload measures what caching costs when
nothing is shared.

    python benchmarks/prefix_caching.py            # full run (a few minutes on 2 cores)
    python benchmarks/prefix_caching.py --quick
    python benchmarks/prefix_caching.py --repeat 3 --compare-cascade --skip-no-shared --step-time 20
    python benchmarks/prefix_caching.py --repeat 5 --skip-shared     # what caching costs, paired runs
    python benchmarks/prefix_caching.py --output-spread 0.5          # answers of 16-48 tokens, not all 32

--compare-cascade adds caching on with cascade attention off (each decode then gathers the shared
prefix itself); --repeat runs every configuration that many times, interleaved, and reports the
median of each figure. --step-time N times N decode steps of `concurrency` requests on the
shared prefix (all in the batch at once), alternating cascade on and off step by step.
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


def run_workload(llm: LLM, prompts: list[list[int]], output_lens: list[int], concurrency: int) -> dict:
    """prompts[i] is answered with output_lens[i] tokens."""
    engine = llm.engine
    engine.kv.pool.reset_prefix_cache()  # every run starts cold, whatever ran before on this engine
    before = llm.get_stats()
    pending = list(zip(prompts, output_lens))
    submitted: dict[str, float] = {}
    ttft: list[float] = []
    generated = 0
    start = time.perf_counter()
    while pending or submitted:
        while pending and len(submitted) < concurrency:
            prompt, output_len = pending.pop(0)
            params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
            request_id = engine.add_request(prompt, params)
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
        "ttft_mean_s": statistics.fmean(ttft),
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
    parser.add_argument(
        "--output-spread",
        type=float,
        default=0.0,
        help="answers of output_len x (1 +- spread) tokens, drawn per request (the same in every run)",
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-shared-len", type=int, default=256, help="prompt length of the no-sharing workload")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration, interleaved; medians")
    parser.add_argument("--compare-cascade", action="store_true", help="also caching on with cascade attention off")
    parser.add_argument("--skip-no-shared", action="store_true", help="only the shared-prefix workload")
    parser.add_argument("--skip-shared", action="store_true", help="only the no-shared-prefix workload")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="engine step budget (default: the engine's)"
    )
    parser.add_argument("--step-time", type=int, default=0, help="decode steps to time, cascade on/off alternating")
    parser.add_argument(
        "--dtype", default="auto", help="model dtype of both engines (bfloat16 on CPUs with bf16 units)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.shared_len, args.concurrency, args.no_shared_len = 8, 200, 4, 64

    rng = random.Random(0)
    common = dict(kv_cache_memory="1GiB", max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype)
    llms = {"off": LLM(**common, enable_prefix_caching=False), "on": LLM(**common, enable_prefix_caching=True)}
    base = llms["on"]
    system = text_tokens(base, rng, args.shared_len)
    shared = [system + text_tokens(base, rng, args.distinct_len) for _ in range(args.num_requests)]
    distinct = [text_tokens(base, rng, args.no_shared_len) for _ in range(args.num_requests)]
    warm = [text_tokens(base, rng, 32)]
    spread = int(args.output_spread * args.output_len)
    output_lens = [args.output_len + rng.randint(-spread, spread) for _ in range(args.num_requests)]
    configs = [("off", llms["off"], True), ("on", base, True)]  # (name, engine, cascade attention)
    if args.compare_cascade:
        configs.append(("on/no-cascade", base, False))
    runs: dict[str, list[dict]] = {}
    for llm in llms.values():
        llm.generate(warm, SamplingParams(max_tokens=2), use_tqdm=False)
    for _ in range(args.repeat):
        for name, llm, cascade in configs:
            llm.engine.runner.cascade_attention = cascade
            if not args.skip_shared:
                result = run_workload(llm, shared, output_lens, args.concurrency)
                runs.setdefault(f"shared/{name}", []).append(result)
            if not args.skip_no_shared and cascade:
                result = run_workload(llm, distinct, output_lens, args.concurrency)
                runs.setdefault(f"no-shared/{name}", []).append(result)
    base.engine.runner.cascade_attention = None  # back to the engine's own rule
    results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}

    print(
        f"\nshared prefix: {args.num_requests} requests x ({args.shared_len} shared + {args.distinct_len} distinct) "
        f"tokens, {args.output_len} out (+-{spread}), concurrency {args.concurrency}; median of {args.repeat} run(s)"
    )
    header = (
        f"{'run':24s} {'prefill computed':>16s} {'hits':>8s} {'TTFT p50':>9s} {'TTFT mean':>9s} {'TTFT p99':>9s} "
        f"{'out tok/s':>10s}"
    )
    print(header)
    for name, r in results.items():
        print(
            f"{name:24s} {r['prefill_tokens_computed']:16.0f} {r['prefix_cache_hit_tokens']:8.0f} "
            f"{r['ttft_p50_s']:9.3f} {r['ttft_mean_s']:9.3f} {r['ttft_p99_s']:9.3f} {r['output_tokens_per_s']:10.1f}"
        )
    off = results.get("shared/off")
    for name in ("on", "on/no-cascade") if off else ():
        if (on := results.get(f"shared/{name}")) is None:
            continue
        print(
            f"caching {name}: prefill tokens computed "
            f"{off['prefill_tokens_computed'] / max(1, on['prefill_tokens_computed']):.1f}x fewer; "
            f"TTFT p50 {off['ttft_p50_s'] / on['ttft_p50_s']:.1f}x lower, mean {off['ttft_mean_s'] / on['ttft_mean_s']:.1f}x, "
            f"p99 {off['ttft_p99_s'] / on['ttft_p99_s']:.1f}x"
        )
    if not args.skip_no_shared:
        cost = 1 - results["no-shared/on"]["output_tokens_per_s"] / results["no-shared/off"]["output_tokens_per_s"]
        print(f"no shared prefix: caching on costs {100 * cost:.1f}% throughput")
        if args.repeat > 1:
            per_run = [
                1 - on["output_tokens_per_s"] / off["output_tokens_per_s"]
                for on, off in zip(runs["no-shared/on"], runs["no-shared/off"])
            ]
            print("  per paired run: " + ", ".join(f"{100 * c:+.1f}%" for c in per_run))
    if args.step_time:
        steps = decode_step_times(base, system, shared[: args.concurrency], args.step_time)
        results["decode_step_ms"] = steps
        print(
            f"decode step, {args.concurrency} requests on the shared prefix, median of {args.step_time // 2} each: "
            f"cascade {steps['cascade']:.1f} ms, no cascade {steps['no-cascade']:.1f} ms "
            f"({steps['no-cascade'] / steps['cascade']:.2f}x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def decode_step_times(llm: LLM, system: list[int], prompts: list[list[int]], steps: int) -> dict[str, float]:
    """Median ms of one engine step while all `prompts` decode together (their shared blocks cached
    first), alternating cascade attention on and off step by step."""
    engine = llm.engine
    engine.kv.pool.reset_prefix_cache()
    llm.generate([system], SamplingParams(max_tokens=1), use_tqdm=False)  # cache the shared blocks
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    while any(engine.groups[i].sequences[0].num_output_tokens == 0 for i in ids):
        engine.step()  # prefill the distinct tails
    times: dict[str, list[float]] = {"cascade": [], "no-cascade": []}
    for i in range(steps):
        cascade = i % 2 == 0
        engine.runner.cascade_attention = cascade
        start = time.perf_counter()
        engine.step()
        times["cascade" if cascade else "no-cascade"].append(1000 * (time.perf_counter() - start))
    engine.runner.cascade_attention = None  # back to the engine's own rule
    for request_id in ids:
        engine.abort(request_id)
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
