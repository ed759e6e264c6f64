"""Tiered KV cache (host RAM + disk below the device pool): tiers off vs on, in one run.

1. Multi-turn chat: C conversations x T turns; each turn resends the whole history (earlier
   user turns and answers) plus a new user message, so a conversation's prompt grows to ~2,000
   tokens. Turns go round-robin (every conversation's turn t, then every turn t+1), at most
   `--concurrency` requests in flight, and the device KV budget holds only a quarter of the
   working set: by the time a conversation comes back, its history has left the device. Prefix
   caching is on in both runs; the difference is whether evicted blocks fall to host RAM and
   disk or are lost. Reported: prefill tokens computed, TTFT p50/p99, total time.
2. Cold restart: a first engine computes a long prefix with the disk tier on and is closed; a
   fresh engine then serves a request with that prefix and a new question. TTFT of that first
   request, disk tier on vs off (median of --restarts fresh engines each, alternating).

    python benchmarks/kv_tiers.py            # the full run (~10 minutes on 2 cores)
    python benchmarks/kv_tiers.py --quick
    python benchmarks/kv_tiers.py --answer-spread 0.5     # answers of 16-48 tokens instead of all 32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import tempfile
import time

from kvserve import LLM, SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))


def text_tokens(llm: LLM, rng: random.Random, count: int) -> list[int]:
    with open(os.path.join(HERE, "words.txt")) as f:
        vocab = f.read().split()
    ids: list[int] = []
    while len(ids) < count:
        ids += llm.tokenizer.encode(" " + " ".join(rng.choice(vocab) for _ in range(64)))
    return ids[:count]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_chat(llm: LLM, user_turns: list[list[list[int]]], answer_lens: list[list[int]], concurrency: int) -> dict:
    engine = llm.engine
    before = llm.get_stats()
    histories: list[list[int]] = [[] for _ in user_turns]
    ttft: list[float] = []
    start = time.perf_counter()
    for turn in range(len(user_turns[0])):
        queue = list(range(len(user_turns)))
        in_flight: dict[str, tuple[int, list[int], float]] = {}
        while queue or in_flight:
            while queue and len(in_flight) < concurrency:
                conv = queue.pop(0)
                prompt = histories[conv] + user_turns[conv][turn]
                params = SamplingParams(temperature=0, max_tokens=answer_lens[conv][turn], ignore_eos=True)
                in_flight[engine.add_request(prompt, params)] = (conv, prompt, time.perf_counter())
            for delta in engine.step():
                conv, prompt, submitted = in_flight[delta.request_id]
                if engine.groups[delta.request_id].sequences[0].num_output_tokens == len(delta.token_ids):
                    ttft.append(time.perf_counter() - submitted)
                if delta.finish_reason is not None:
                    out = engine.pop_finished(delta.request_id)
                    histories[conv] = prompt + out.outputs[0].token_ids
                    del in_flight[delta.request_id]
    elapsed = time.perf_counter() - start
    after = llm.get_stats()
    engine.check_idle()
    return {
        "prefill_tokens_computed": after["num_computed_prefill_tokens"] - before["num_computed_prefill_tokens"],
        "prefix_cache_hit_tokens": after["prefix_cache_hits"] - before["prefix_cache_hits"],
        "host_hit_tokens": after.get("kv_offload_host_hit_tokens", 0),
        "disk_hit_tokens": after.get("kv_offload_disk_hit_tokens", 0),
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": percentile(ttft, 0.99),
        "seconds": elapsed,
        "final_history_tokens": max(len(h) for h in histories),
    }


def first_request_ttft(llm: LLM, prompt: list[int]) -> float:
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=1), use_tqdm=False)  # first-call warm-up
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return out.metrics.first_token_time - out.metrics.arrival_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--user-len", type=int, default=300, help="tokens of each new user message")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument(
        "--answer-spread",
        type=float,
        default=0.0,
        help="answers of output-len x (1 +- this), drawn per turn (0: all equal, requests then finish in lockstep)",
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--device-share", type=float, default=0.25, help="device KV budget / working set")
    parser.add_argument("--host-share", type=float, default=0.5, help="host tier / working set (disk holds all)")
    parser.add_argument("--prefix-len", type=int, default=2000, help="cold restart: the known long prefix")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--dir", default=None, help="disk tier folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.turns, args.user_len, args.prefix_len, args.restarts = 8, 3, 100, 400, 1

    folder = args.dir or tempfile.mkdtemp(prefix="kvserve-tiers-")
    probe = LLM(kv_cache_memory="16MiB", max_model_len=64)
    bytes_per_token = probe.engine.runner.model.kv_bytes_per_token(probe.engine.config.torch_dtype)
    rng = random.Random(0)
    user_turns = [
        [text_tokens(probe, rng, args.user_len) for _ in range(args.turns)] for _ in range(args.conversations)
    ]
    spread = int(args.answer_spread * args.output_len)
    answer_lens = [
        [args.output_len + rng.randint(-spread, spread) for _ in range(args.turns)] for _ in range(args.conversations)
    ]
    prefix = text_tokens(probe, rng, args.prefix_len)
    questions = [text_tokens(probe, rng, 20) for _ in range(2 * args.restarts + 1)]
    del probe
    working_set = args.conversations * args.turns * (args.user_len + args.output_len) * bytes_per_token
    device = int(args.device_share * working_set)
    longest = args.turns * (args.user_len + args.output_len + spread) + 16
    common = dict(kv_cache_memory=device, max_model_len=longest)
    tiers = dict(
        kv_offload_memory=int(args.host_share * working_set),
        kv_offload_dir=os.path.join(folder, "chat"),
        kv_offload_disk=2 * working_set,
    )
    print(f"working set {working_set / 2**20:.0f} MiB, device KV {device / 2**20:.0f} MiB, tiers {tiers}")

    results: dict[str, dict] = {}
    for name, extra in (("tiers off", {}), ("tiers on", tiers)):
        llm = LLM(**common, **extra)
        llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=2), use_tqdm=False)
        results[name] = run_chat(llm, user_turns, answer_lens, args.concurrency)
        llm.engine.close()
        del llm
        gc.collect()

    restart_dir = os.path.join(folder, "restart")
    disk = dict(kv_offload_dir=restart_dir, kv_offload_disk=4 * args.prefix_len * bytes_per_token)
    writer = LLM(kv_cache_memory="1GiB", **disk)
    writer.generate([prefix + questions[0]], SamplingParams(max_tokens=1), use_tqdm=False)
    writer.engine.close()
    del writer
    gc.collect()
    cold: dict[str, list[float]] = {"disk tier off": [], "disk tier on": []}
    for i in range(args.restarts):
        for name, extra in (("disk tier off", {}), ("disk tier on", disk)):
            llm = LLM(kv_cache_memory="1GiB", **extra)
            cold[name].append(first_request_ttft(llm, prefix + questions[1 + 2 * i + (name == "disk tier on")]))
            llm.engine.close()
            del llm
            gc.collect()
    if args.dir is None:
        shutil.rmtree(folder, ignore_errors=True)

    print(
        f"\nmulti-turn chat: {args.conversations} conversations x {args.turns} turns "
        f"({args.user_len} user + {args.output_len} +- {spread} answer tokens per turn), concurrency {args.concurrency}"
    )
    print(
        f"{'run':10s} {'prefill computed':>16s} {'hits':>8s} {'host':>7s} {'disk':>7s} {'TTFT p50':>9s} "
        f"{'TTFT p99':>9s} {'total s':>8s}"
    )
    for name, r in results.items():
        print(
            f"{name:10s} {r['prefill_tokens_computed']:16d} {r['prefix_cache_hit_tokens']:8d} {r['host_hit_tokens']:7d} "
            f"{r['disk_hit_tokens']:7d} {r['ttft_p50_s']:9.3f} {r['ttft_p99_s']:9.3f} {r['seconds']:8.1f}"
        )
    off, on = results["tiers off"], results["tiers on"]
    print(
        f"prefill computed {off['prefill_tokens_computed'] / max(1, on['prefill_tokens_computed']):.1f}x fewer, "
        f"TTFT p50 {off['ttft_p50_s'] / on['ttft_p50_s']:.1f}x lower, p99 {off['ttft_p99_s'] / on['ttft_p99_s']:.1f}x, "
        f"total time {off['seconds'] / on['seconds']:.2f}x shorter"
    )
    cold_off, cold_on = statistics.median(cold["disk tier off"]), statistics.median(cold["disk tier on"])
    print(
        f"\ncold restart, first request with a known {args.prefix_len}-token prefix: TTFT {cold_off:.3f}s (disk tier "
        f"off) vs {cold_on:.3f}s (on): {cold_off / cold_on:.1f}x lower   runs: {cold}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "chat": results, "cold_restart": cold}, f, indent=2)


if __name__ == "__main__":
    main()
