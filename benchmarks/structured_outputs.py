"""The cost of a JSON-schema constraint (issue 16): output tok/s of 64 chat requests, 32 at once, with
and without `response_format: json_schema`, in one run against one server; and the time to first token
of a single request with no schema, the server's first schema (xgrammar's tokenizer set-up + compile),
a new schema (compile) and a cached one.

    python benchmarks/structured_outputs.py [--requests 64] [--concurrency 32] [--max-tokens 128]

The schema asks for an array of at least 50 objects, so no constrained answer ends before max_tokens,
and the unconstrained requests run with ignore_eos: both sides generate exactly the same number of
tokens. The server is the default model's, started here on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx

from kvserve.server.launch import ServerProcess

ROW = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "temp": {"type": "integer"}},
    "required": ["city", "temp"],
    "additionalProperties": False,
}


def schema(tag: int) -> dict:
    """A long answer: at least 50 rows. `tag` makes schemas that differ (a new compile each)."""
    return {
        "type": "object",
        "properties": {"report": {"enum": [f"weather-{tag}"]}, "rows": {"type": "array", "minItems": 50, "items": ROW}},
        "required": ["report", "rows"],
        "additionalProperties": False,
    }


def body(i: int, max_tokens: int, constrained: bool, tag: int = 0) -> dict:
    request = {
        "messages": [{"role": "user", "content": f"List the weather in {50 + i} cities as JSON."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": i,
    }
    if constrained:
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema(tag)}}
    else:
        request["ignore_eos"] = True
    return request


async def throughput(url: str, requests: int, concurrency: int, max_tokens: int, constrained: bool) -> dict:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(i: int) -> int:
            async with gate:
                r = await client.post("/v1/chat/completions", json=body(i, max_tokens, constrained))
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
    return {"output_tokens": sum(tokens), "seconds": wall, "output_tok_s": sum(tokens) / wall}


def first_token_seconds(url: str, request: dict) -> float:
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json={**request, "stream": True}, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token came back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report: dict = {}
    with ServerProcess(["--kv-cache-memory", "512MiB"]) as server:
        url = server.url
        ttft = {"no schema": first_token_seconds(url, body(0, 4, False))}
        ttft["first schema (tokenizer set-up + compile)"] = first_token_seconds(url, body(0, 4, True, tag=1))
        ttft["new schema (compile)"] = first_token_seconds(url, body(0, 4, True, tag=2))
        ttft["cached schema"] = first_token_seconds(url, body(0, 4, True, tag=2))
        report["ttft_s"] = ttft
        runs = {}
        for constrained in (False, True, False, True):  # alternated: drift hits both sides alike
            name = "json_schema" if constrained else "free"
            result = asyncio.run(throughput(url, args.requests, args.concurrency, args.max_tokens, constrained))
            runs.setdefault(name, []).append(result)
            print(f"  {name:12s} {result['output_tok_s']:6.1f} output tok/s ({result['output_tokens']} tokens)")
        best = {name: max(r["output_tok_s"] for r in results) for name, results in runs.items()}
        report["runs"] = runs
        report["ratio"] = best["json_schema"] / best["free"]
    for name, seconds in ttft.items():
        print(f"  time to first token, {name}: {seconds * 1e3:.0f} ms")
    print(f"  json_schema / free, {args.concurrency} at once: {report['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
