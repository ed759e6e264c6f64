"""`kvserve bench serve`: a serving benchmark client for any OpenAI-compatible server.

Sends N streaming requests (prompt length, output length, an optional shared prefix) either at a fixed
concurrency (a closed loop: each finished request starts the next) or as a Poisson process at a given rate
(an open loop, optionally capped by --concurrency), and reports output tokens/s, requests/s, TTFT,
inter-token latency (ITL) and end-to-end latency percentiles, and failures. `--plot` draws the latency
percentiles and throughput over time.

Timing is taken on the client, from sending the request: TTFT to the first chunk carrying text, ITL
between successive text chunks (one token each from kvserve and vLLM; a server that batches tokens into
chunks shows fewer, longer gaps), E2E to the end of the stream. Output tokens come from the server's
`usage` when it sends one (stream_options.include_usage), else from the chunk count.

Prompts are random common English words. With `--tokenizer` (a model path, or `default` for kvserve's default
model) they are cut to exactly --prompt-len tokens; without, one word is about one token. The same --seed
gives the same prompts, so two servers can be compared on one workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field

_WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education foot boy age policy music market"
).split()

# How each kind of server is told to produce exactly max_tokens tokens (ignoring EOS).
_EXACT_LENGTH = {
    "openai": lambda n: {"ignore_eos": True, "min_tokens": n},  # kvserve, vLLM, SGLang
    # transformers serve rejects unknown fields; its generation_config replaces the model's (so no EOS stop)
    "transformers": lambda n: {"generation_config": json.dumps({"max_new_tokens": n, "min_new_tokens": n})},
    "none": lambda n: {},
}


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    output_tokens: int = 0
    prompt_tokens: int | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def make_prompts(count: int, length: int, shared_prefix_len: int = 0, seed: int = 0, tokenizer=None) -> list[str]:
    """`count` prompts of about `length` tokens (exactly, given a kvserve Tokenizer), the first
    `shared_prefix_len` of which are the same in every prompt."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    def cut(text: str, n: int) -> str:
        if tokenizer is None:
            return " ".join(text.split()[:n])
        ids = tokenizer.encode(text, add_special_tokens=False)
        while len(ids) < n:
            ids += tokenizer.encode(" " + words(n), add_special_tokens=False)
        return tokenizer.decode(ids[:n])

    prefix = cut(words(shared_prefix_len), shared_prefix_len) if shared_prefix_len else ""
    rest = max(length - shared_prefix_len, 1)
    return [(prefix + " " if prefix else "") + cut(words(rest + 8), rest) for _ in range(count)]


async def _one(client, args, prompt: str, result: RequestResult) -> None:
    import httpx

    if args.endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body |= {"model": args.model, "max_tokens": args.output_len, "temperature": args.temperature, "stream": True}
    if args.backend != "transformers":
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body |= _EXACT_LENGTH[args.backend](args.output_len)
    body |= args.extra_body
    result.start = time.perf_counter()
    usage_tokens = None
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    result.error = f"stream error: {str(obj['error'])[:200]}"
                    return
                now = time.perf_counter()
                for choice in obj.get("choices") or []:
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        result.chunk_times.append(now)
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                    result.prompt_tokens = obj["usage"].get("prompt_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return
    finally:
        result.end = time.perf_counter()
    result.output_tokens = usage_tokens if usage_tokens is not None else len(result.chunk_times)
    result.ok = True


async def run_benchmark(args, prompts: list[str]) -> tuple[list[RequestResult], float, float]:
    """Runs the workload; returns the per-request results and the start and end time of the run."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base, headers=headers, timeout=args.timeout, limits=limits) as client:
        if args.model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            args.model = r.json()["data"][0]["id"]
        for _ in range(args.warmup):
            warm = argparse.Namespace(**{**vars(args), "output_len": 4})
            await _one(client, warm, prompts[0], RequestResult())
        results = [RequestResult() for _ in prompts]
        limit = asyncio.Semaphore(args.concurrency) if args.concurrency else None
        rng = random.Random(args.seed + 1)

        async def launch(i: int) -> None:
            if limit is None:
                await _one(client, args, prompts[i], results[i])
                return
            async with limit:
                await _one(client, args, prompts[i], results[i])

        start = time.perf_counter()
        tasks = []
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(launch(i)))
            if args.request_rate:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
        return results, start, time.perf_counter()


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(results: list[RequestResult], start: float, end: float) -> dict:
    ok = [r for r in results if r.ok]
    duration = end - start
    output = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itls]
    e2es = [r.end - r.start for r in ok]
    summary = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "output_tokens": output,
        "output_tokens_per_s": output / duration if duration > 0 else 0.0,
        "mean_prompt_tokens": (sum(r.prompt_tokens for r in ok if r.prompt_tokens) / len(ok)) if ok else None,
        "mean_output_tokens": output / len(ok) if ok else None,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    for name, values in (("ttft", ttfts), ("itl", itls), ("e2e", e2es)):
        summary[f"{name}_mean_ms"] = 1000 * sum(values) / len(values) if values else None
        for q in (50, 90, 99):
            value = percentile(values, q)
            summary[f"{name}_p{q}_ms"] = None if value is None else 1000 * value
    return summary


def format_summary(summary: dict) -> str:
    def ms(key: str) -> str:
        return "-" if summary[key] is None else f"{summary[key]:.1f}"

    lines = [
        f"completed {summary['completed']}, failed {summary['failed']}, in {summary['duration_s']:.2f} s",
        f"requests/s        {summary['requests_per_s']:.2f}",
        f"output tokens/s   {summary['output_tokens_per_s']:.1f}  ({summary['output_tokens']} tokens)",
        f"{'':18}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}   (ms)",
    ]
    for name, label in (("ttft", "TTFT"), ("itl", "ITL"), ("e2e", "E2E latency")):
        cells = "".join(f"{ms(f'{name}_{k}_ms'):>9}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{label:18}{cells}")
    lines += [f"error: {e}" for e in summary["errors"]]
    return "\n".join(lines)


def plot(results: list[RequestResult], summary: dict, start: float, path: str, title: str = "") -> None:
    """Latency percentiles (TTFT, ITL, E2E) and output tokens/s and in-flight requests over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [("ttft", "TTFT"), ("itl", "ITL"), ("e2e", "E2E")]
    width = 0.25
    for k, q in enumerate((50, 90, 99)):
        values = [summary[f"{n}_p{q}_ms"] or 0 for n, _ in names]
        left.bar([i + (k - 1) * width for i in range(len(names))], values, width, label=f"p{q}")
    left.set_xticks(range(len(names)), [label for _, label in names])
    left.set_yscale("log")
    left.set_ylabel("ms (log scale)")
    left.set_title("latency percentiles")
    left.legend()

    ok = [r for r in results if r.ok and r.chunk_times]
    duration = summary["duration_s"]
    bin_s = max(duration / 60, 0.25)
    bins = [0.0] * (int(duration / bin_s) + 1)
    for r in ok:
        per_chunk = r.output_tokens / len(r.chunk_times)  # a chunk may carry several tokens
        for t in r.chunk_times:
            bins[min(int((t - start) / bin_s), len(bins) - 1)] += per_chunk
    xs = [(i + 0.5) * bin_s for i in range(len(bins))]
    right.plot(xs, [b / bin_s for b in bins], color="tab:blue", label="output tokens/s")
    right.set_xlabel("seconds since start")
    right.set_ylabel("output tokens/s", color="tab:blue")
    right.set_title(f"throughput over time (mean {summary['output_tokens_per_s']:.0f} tokens/s)")
    inflight = right.twinx()
    events = sorted([(r.start - start, 1) for r in results] + [(r.end - start, -1) for r in results])
    level, ts, levels = 0, [], []
    for t, step in events:
        level += step
        ts.append(t)
        levels.append(level)
    inflight.step(ts, levels, where="post", color="tab:gray", alpha=0.6)
    inflight.set_ylabel("requests in flight", color="tab:gray")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    serve = sub.add_parser("serve", help="load-test an OpenAI-compatible server (kvserve, vLLM, transformers serve)")
    serve.add_argument("--base", default="http://127.0.0.1:8000", help="server URL, without /v1")
    serve.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    serve.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--num-requests", type=int, default=64)
    serve.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (about, without --tokenizer)")
    serve.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    serve.add_argument("--shared-prefix-len", type=int, default=0, help="leading prompt tokens all requests share")
    serve.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 32 without a rate)")
    serve.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (open loop)")
    serve.add_argument("--temperature", type=float, default=0.0)
    serve.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let requests stop at EOS")
    serve.add_argument(
        "--backend",
        choices=sorted(_EXACT_LENGTH),
        default="openai",
        help="how to ask for exactly --output-len tokens: openai (ignore_eos, kvserve/vLLM), transformers "
        "(generation_config, for `transformers serve`), none",
    )
    serve.add_argument("--extra-body", type=json.loads, default={}, help="JSON fields added to every request")
    serve.add_argument("--tokenizer", default=None, help="model path (or 'default') to cut prompts to exact lengths")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--warmup", type=int, default=1, help="short requests sent before timing")
    serve.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    serve.add_argument("--plot", default=None, help="write latency and throughput plots to this PNG")
    serve.add_argument("--json", default=None, help="write the summary (and settings) as JSON here")
    serve.set_defaults(func=cmd_bench_serve)


def load_tokenizer(spec: str | None):
    if spec is None:
        return None
    from kvserve.models.paths import resolve_model_path
    from kvserve.tokenizer import Tokenizer

    return Tokenizer.load(resolve_model_path(None if spec == "default" else spec))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the summary
    if args.concurrency is None and not args.request_rate:
        args.concurrency = 32
    if args.num_requests < 1 or args.output_len < 1 or args.prompt_len < 1:
        raise ValueError("--num-requests, --output-len and --prompt-len must be >= 1")
    prompts = make_prompts(
        args.num_requests, args.prompt_len, args.shared_prefix_len, args.seed, load_tokenizer(args.tokenizer)
    )
    mode = f"concurrency {args.concurrency}" if not args.request_rate else f"Poisson {args.request_rate}/s"
    print(
        f"{args.base}: {args.num_requests} requests, ~{args.prompt_len} prompt tokens "
        f"({args.shared_prefix_len} shared), {args.output_len} output tokens, {mode}",
        file=sys.stderr,
    )
    results, start, end = asyncio.run(run_benchmark(args, prompts))
    summary = summarize(results, start, end)
    print(format_summary(summary))
    if args.plot:
        plot(results, summary, start, args.plot, title=f"{args.model} @ {args.base}, {mode}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "summary": summary, "requests": [asdict(r) for r in results]}, f)
    return 0 if summary["failed"] == 0 else 1


def bench_namespace(**overrides) -> argparse.Namespace:
    """The `bench serve` settings with their defaults, overridden by keyword (for scripts)."""
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "serve"])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown bench setting {key!r}")
        setattr(args, key, value)
    return args
