"""What an open dashboard costs the server: output throughput with GET /v1/kv/state streaming (what the
page at /dashboard receives, ~2 Hz) against none, in one run on one server.

One kvserve server (the default Q4_1 model, float16 KV, 256 MiB), the same `bench serve` workload
(64 requests x 128 prompt / 128 output tokens, 32 at once) repeated in alternating rounds, closed and
open, so that the machine's drift falls on both alike. "Open" runs `--viewers` clients reading the
state stream meanwhile (a browser's EventSource sees the same bytes; the browser's own rendering runs
on the viewer's machine, not the server's). Also reports how long one state build takes on the
engine thread.

    python benchmarks/dashboard_cost.py [--rounds 3] [--viewers 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import httpx

from kvserve.bench import bench_namespace, make_prompts, run_benchmark, summarize
from kvserve.server.launch import ServerProcess


def viewer(url: str, stop: threading.Event, counts: list[int]) -> None:
    with httpx.Client(timeout=httpx.Timeout(30, read=None)) as client:
        with client.stream("GET", url + "/v1/kv/state", params={"stream": "true", "interval": 0.5}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    counts[0] += 1
                if stop.is_set():
                    return


def round_throughput(url: str, prompts: list[str]) -> float:
    args = bench_namespace(base=url, num_requests=len(prompts), output_len=128, concurrency=32, warmup=0)
    results, start, end = asyncio.run(run_benchmark(args, prompts))
    summary = summarize(results, start, end)
    assert summary["failed"] == 0
    return summary["output_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--viewers", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    server = ServerProcess(["--kv-cache-memory", "256MiB", "--kv-cache-dtype", "float16"]).start()
    try:
        from kvserve.bench import load_tokenizer

        prompts = make_prompts(64, 128, 0, 0, load_tokenizer("default"))
        round_throughput(server.url, prompts[:8])  # warm-up
        closed, opened, updates = [], [], []
        for _ in range(args.rounds):
            closed.append(round_throughput(server.url, prompts))
            stop, counts = threading.Event(), [0]
            threads = [threading.Thread(target=viewer, args=(server.url, stop, counts)) for _ in range(args.viewers)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            began = time.perf_counter()
            opened.append(round_throughput(server.url, prompts))
            updates.append(counts[0] / (time.perf_counter() - began + 1.0))
            stop.set()
            for t in threads:
                t.join(timeout=30)
        builds = []
        for _ in range(20):  # one state, built on the idle engine thread, timed end to end by the client
            start = time.perf_counter()
            httpx.get(server.url + "/v1/kv/state", timeout=30).raise_for_status()
            builds.append(1000 * (time.perf_counter() - start))
            time.sleep(0.3)  # past the feed's 0.25 s reuse
        size = len(httpx.get(server.url + "/v1/kv/state", timeout=30).content)
    finally:
        server.stop()
    ratio = statistics.median(opened) / statistics.median(closed)
    print(f"output tok/s, dashboard closed: {', '.join(f'{x:.1f}' for x in closed)}")
    print(f"output tok/s, dashboard open ({args.viewers} viewer(s), ~{statistics.mean(updates):.1f} states/s each): "
          f"{', '.join(f'{x:.1f}' for x in opened)}")  # fmt: skip
    print(
        f"open / closed, medians: {ratio:.3f}x; per round: {', '.join(f'{o / c:.3f}' for o, c in zip(opened, closed))}"
    )
    print(f"one state (default model, 728 blocks): {statistics.median(builds):.1f} ms median end to end, {size:,} B")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"closed": closed, "open": opened, "ratio": ratio, "state_ms": builds, "state_bytes": size}, f)


if __name__ == "__main__":
    main()
