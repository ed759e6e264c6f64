"""Routing policies against a multi-tenant workload (issue 18).

`kvserve serve --data-parallel-size 2` (two workers, one core each, the default model) is started once per
policy, with cold caches, and sent the same workload: 8 tenants, each with its own ~600-token system
prompt, 8 questions each, arriving interleaved (tenant 0, 1, ..., 7, 0, 1, ...) at a fixed rate, as
streaming completions. Each worker's KV budget holds about 3.8 of the 8 system prompts (--kv-cache-memory),
so a policy that sends every tenant to both workers makes each hold all 8 and evict them in turn, while
one that keeps a tenant on one worker needs 4 per worker (a prompt whose tail blocks were evicted still hits
with its head: the pool evicts tails first). The tenants come in a new random order each round.

For each policy: the prefix-cache hit rate (cached / prompt tokens, from each answer's usage), TTFT p50 /
p99, output tokens/s, and the split of requests between the workers.

    python benchmarks/router.py [--rate 2] [--json router.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import httpx

from kvserve.server.launch import ServerProcess

POLICIES = ("round_robin", "least_load", "prefix", "cost")


@dataclass
class Result:
    tenant: int
    worker: str = ""
    ttft_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


def workload(tenants: int, questions: int, system_words: int, seed: int) -> list[tuple[int, str]]:
    """(tenant, prompt) in arrival order: question j of every tenant before question j + 1 of any, the tenants
    in a new random order each round (in a fixed order, round-robin over an even number of workers would
    send every tenant to one worker and be prefix-aware by accident)."""
    words = open(__file__.replace("router.py", "words.txt")).read().split()
    rng = random.Random(seed)
    systems = [
        f"You are the assistant of tenant {t}. " + " ".join(rng.choice(words) for _ in range(system_words))
        for t in range(tenants)
    ]
    out = []
    for q in range(questions):
        order = list(range(tenants))
        rng.shuffle(order)
        for t in order:
            question = " ".join(rng.choice(words) for _ in range(12))
            out.append((t, f"{systems[t]}\n\nQuestion {q}: {question}?\nAnswer:"))
    return out


async def one(client: httpx.AsyncClient, tenant: int, prompt: str, max_tokens: int) -> Result:
    result = Result(tenant)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            result.worker = r.headers.get("x-kvserve-worker", "")
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                if result.ttft_s is None and any(c.get("text") for c in chunk.get("choices") or []):
                    result.ttft_s = time.perf_counter() - start
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.output_tokens = usage["completion_tokens"]
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def drive(url: str, work: list[tuple[int, str]], rate: float, max_tokens: int) -> tuple[list[Result], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        tasks = []
        for tenant, prompt in work:
            tasks.append(asyncio.create_task(one(client, tenant, prompt, max_tokens)))
            await asyncio.sleep(1 / rate)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_policy(policy: str, args: argparse.Namespace, work: list[tuple[int, str]]) -> dict:
    server_args = ["--data-parallel-size", "2", "--policy", policy, "--kv-cache-memory", args.kv_cache_memory]
    server_args += ["--kv-cache-dtype", "float16", "--max-model-len", "1024"]
    if args.overlap_weight is not None:
        server_args += ["--overlap-weight", str(args.overlap_weight)]
    if args.balance_abs_threshold is not None:
        server_args += ["--balance-abs-threshold", str(args.balance_abs_threshold)]
    with ServerProcess(server_args) as server:
        # one request per tenant-free prompt warms each worker's kernels without caching any system prompt
        asyncio.run(drive(server.url, [(-1, "Hello there, how are you today?")] * 4, 4.0, 4))
        results, elapsed = asyncio.run(drive(server.url, work, args.rate, args.max_tokens))
        decisions = {
            line.split('reason="')[1].split('"')[0]: float(line.split()[-1])
            for line in httpx.get(server.url + "/metrics").text.splitlines()
            if line.startswith("kvserve_router:decisions_total{")
        }
    ok = [r for r in results if r.error is None]
    split = Counter(r.worker for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "policy": policy,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_s": percentile(ttfts, 0.99) if ttfts else None,
        "output_tok_s": sum(r.output_tokens for r in ok) / elapsed,
        "split": sorted(split.values(), reverse=True),
        "elapsed_s": elapsed,
        "decisions": decisions,
        "results": [asdict(r) for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second, a fixed interval")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--system-words", type=int, default=450, help="~600 tokens with the default tokenizer")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-memory", default="52MiB", help="per worker: ~3.8 of the 8 system prompts")
    parser.add_argument("--overlap-weight", type=float, default=None, help="the cost policy's (default: its own)")
    parser.add_argument("--balance-abs-threshold", type=int, default=None, help="the router's (default: its own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    work = workload(args.tenants, args.questions, args.system_words, args.seed)
    reports = [run_policy(p, args, work) for p in args.policies.split(",")]
    print(f"{'policy':<12} {'hit rate':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'out tok/s':>9}  split  errors")
    for r in reports:
        split = "/".join(str(n) for n in r["split"])
        p50, p99 = r["ttft_p50_s"] or 0.0, r["ttft_p99_s"] or 0.0
        print(
            f"{r['policy']:<12} {r['hit_rate']:>8.1%} {p50:>8.2f}s {p99:>8.2f}s {r['output_tok_s']:>9.1f}  "
            f"{split:<6} {r['errors']}  {r['decisions']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "reports": reports}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
