"""The KV-cache-aware router (issue 18): policies and index on their own, then the router with two real
kvserve workers (a tiny random llama, started here on 127.0.0.1, KV events on), and `kvserve serve
--data-parallel-size 2`.

Prompts are token ids (the tiny model has no tokenizer): the router hashes them as the workers do.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import httpx
import pytest
import torch
from helpers import TINY_LLAMA_BLOCK_BYTES as BLOCK_BYTES
from helpers import save_tiny_model

from kvserve.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvserve.kv.prefix_hash import extend_block_hashes, root_hash
from kvserve.router.index import KVIndex
from kvserve.router.policies import RoutedRequest, make_policy
from kvserve.router.workers import Worker
from kvserve.server.launch import ServerProcess, free_port


def ids(count: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (count,), generator=g).tolist()


# ---------------------------------------------------------------- index and policies, exact


ROOT = root_hash("test")


def chain(tokens: list[int]) -> list[bytes]:
    out: list[bytes] = []
    extend_block_hashes(out, ROOT, lambda a, b: tokens[a:b], len(tokens), 16)
    return out


def two_workers(index: KVIndex) -> tuple[Worker, Worker]:
    a, b = (
        Worker("http://a", healthy=True, root_hash=ROOT, block_size=16),
        Worker("http://b", healthy=True, root_hash=ROOT, block_size=16),
    )
    return a, b


def request(tokens: list[int], out: int = 0) -> RoutedRequest:
    return RoutedRequest({ROOT: chain(tokens)}, -(-len(tokens) // 16), -(-(len(tokens) + out) // 16))


def test_index_follows_events_and_counts_leading_blocks_only():
    index = KVIndex()
    hashes = chain(ids(64, 0))
    index.apply("w", KVEventBatch(0.0, [BlockStored(hashes[:3], None, [], 16, None, "device")]))
    assert index.matched_blocks("w", hashes) == 3
    index.apply(
        "w",
        KVEventBatch(0.0, [BlockRemoved(hashes[1:2], "device"), BlockStored(hashes[1:2], None, [], 16, None, "disk")]),
    )
    assert index.matched_blocks("w", hashes) == 3  # a lower tier's block counts: it is loaded, not computed
    index.apply("w", KVEventBatch(0.0, [BlockRemoved(hashes[:1], "device")]))
    assert index.matched_blocks("w", hashes) == 0  # the chain breaks at its first block
    assert index.snapshot("w") == {"device": {hashes[2]}, "disk": {hashes[1]}}
    index.apply("w", KVEventBatch(0.0, [AllBlocksCleared()]))
    assert index.snapshot("w") == {} and index.matched_blocks("nobody", hashes) == 0


def test_policies_choose_exactly():
    index = KVIndex()
    a, b = two_workers(index)
    shared = ids(64, 1)
    index.apply(b.url, KVEventBatch(0.0, [BlockStored(chain(shared), None, [], 16, None, "device")]))
    hit, miss = request(shared + ids(16, 2)), request(ids(80, 3))

    rr = make_policy("round_robin", index)
    assert [rr.choose([a, b], miss).worker for _ in range(4)] == [a, b, a, b]

    a.in_flight = 2
    assert make_policy("least_load", index).choose([a, b], hit).worker is b
    a.in_flight = 0

    prefix = make_policy("prefix", index)
    decision = prefix.choose([a, b], hit)
    assert (decision.worker, decision.reason, decision.predicted_cached_blocks) == (b, "prefix_hit", 4)
    b.in_flight = 1
    assert (prefix.choose([a, b], miss).worker, prefix.choose([a, b], miss).reason) == (a, "no_prefix_hit")
    b.in_flight = 9  # 9 - 0 > 8 and 9 > 1.5 x 0: load decides
    assert (prefix.choose([a, b], hit).worker, prefix.choose([a, b], hit).reason) == (a, "balance")

    cost = make_policy("cost", index, overlap_weight=1.0)
    b.in_flight = 0
    # b: 5 blocks to compute - 4 held = 1 + 0 active; a: 5 + 0
    assert (cost.choose([a, b], hit).worker, cost.choose([a, b], hit).reason) == (b, "cost_prefix_hit")
    b.active_blocks = 5  # b busy with 5 blocks: 1 + 5 > 5 + 0
    assert cost.choose([a, b], hit).worker is a
    b.active_blocks = 3  # 1 + 3 < 5 + 0
    assert cost.choose([a, b], hit).worker is b
    b.active_blocks = 60  # the default weight, 16: 16 x 1 + 60 < 16 x 5 + 0, and 16 + 70 > 80
    assert make_policy("cost", index).choose([a, b], hit).worker is b
    b.active_blocks = 70
    assert make_policy("cost", index).choose([a, b], hit).worker is a
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("random", index)


# ---------------------------------------------------------------- two real workers behind the router


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(str(folder), "llama")
    return str(folder)


def worker_args(model: str | None, kv_cache_memory: int) -> list[str]:
    events = f"tcp://127.0.0.1:{free_port()}"
    replay = f"tcp://127.0.0.1:{free_port()}"
    model_args = ["--model", model] if model else []
    return [
        *model_args, "--max-model-len", "256", "--kv-cache-memory", str(kv_cache_memory),
        "--kv-events-endpoint", events, "--kv-events-replay-endpoint", replay,
    ]  # fmt: skip


def router_process(workers: list[ServerProcess], model: str | None, policy: str) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "kvserve.cli", "router", "--port", str(port), "--policy", policy]
    command += ["--health-interval", "0.2", *(["--model", model] if model else [])]
    for w in workers:
        command += ["--worker", w.url]
    return ServerProcess([], port=port, command=command)


class Cluster:
    """`count` workers of `model` (None: the default model) and a router in front of them."""

    def __init__(self, model: str | None, policy: str = "prefix", blocks: int = 64, count: int = 2) -> None:
        kv_bytes = blocks * (BLOCK_BYTES if model else 16 * 46080)  # the default model: 46,080 B a token in fp32
        self.workers = [ServerProcess(worker_args(model, kv_bytes)) for _ in range(count)]
        for w in self.workers:
            w.start()
        self.router = router_process(self.workers, model, policy).start()

    def state(self) -> list[dict]:
        return httpx.get(self.router.url + "/workers", timeout=10).json()

    def stop(self) -> None:
        for server in (self.router, *self.workers):
            server.stop()


@pytest.fixture(scope="module")
def cluster(tiny):
    c = Cluster(tiny, "prefix", blocks=24)
    yield c
    c.stop()


def complete(url: str, prompt: list[int], max_tokens: int = 4, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_prefix_policy_sends_a_known_prefix_to_the_worker_holding_it(cluster):
    prefix = ids(64, 10)  # 4 blocks
    first = complete(cluster.router.url, prefix + [7])
    assert first.status_code == 200, first.text
    holder = first.headers["x-kvserve-worker"]
    wait_for(lambda: len(next(w for w in cluster.state() if w["url"] == holder)["blocks"].get("device", [])) >= 4)
    for i in range(4):
        again = complete(cluster.router.url, prefix + ids(20, 100 + i))
        assert again.headers["x-kvserve-worker"] == holder
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    metrics = httpx.get(cluster.router.url + "/metrics").text
    assert 'kvserve_router:decisions_total{policy="prefix",reason="prefix_hit"} 4.0' in metrics
    assert f'kvserve_router:actual_cached_tokens_total{{worker="{holder}"}} 256.0' in metrics
    assert f'kvserve_router:predicted_cached_tokens_total{{worker="{holder}"}} 256.0' in metrics


def sse_choices(response: httpx.Response) -> list:
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            out.append(json.loads(line[6:])["choices"])
        elif line == "data: [DONE]":
            out.append("[DONE]")
    return out


def test_streaming_through_the_router_equals_streaming_direct():
    """The default model (the tiny one has no tokenizer, so no text to stream), one worker: the same chunks
    either way, for a text completion (tokenized by the router to route it) and a chat."""
    cluster = Cluster(None, "cost", blocks=32, count=1)
    try:
        for path, body in (
            ("/v1/completions", {"prompt": "The capital of France is"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}]}),
        ):
            body |= {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
            # once first, so that both runs below find the same prompt blocks cached and compute the same rest
            # (a cold prefill and a prefix hit may break a near-tie differently)
            httpx.post(cluster.workers[0].url + path, json=body, timeout=60)
            routed = httpx.post(cluster.router.url + path, json=body, timeout=60)
            direct = httpx.post(cluster.workers[0].url + path, json=body, timeout=60)
            assert routed.headers["content-type"].startswith("text/event-stream")
            assert sse_choices(routed) == sse_choices(direct)
            assert len(sse_choices(routed)) >= 13
        metrics = httpx.get(cluster.router.url + "/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("kvserve_router:prompt_tokens_total{"))
        assert float(line.split()[-1]) > 10  # the router tokenized both prompts (template included) to route them
    finally:
        cluster.stop()


def test_the_router_index_matches_the_workers_pools_after_evictions(cluster):
    # 16 prompts of 4 blocks through 24-block pools: both workers evict
    for i in range(16):
        assert complete(cluster.router.url, ids(70, 200 + i), max_tokens=2).status_code == 200

    def matches() -> bool:
        state = {w["url"]: w["blocks"] for w in cluster.state()}
        pools = {w.url: httpx.get(w.url + "/kv_cache/blocks").json() for w in cluster.workers}
        return all({m: sorted(v) for m, v in pools[url].items() if v} == state[url] for url in pools)

    wait_for(matches)
    removed = [httpx.get(w.url + "/metrics").text for w in cluster.workers]
    assert all("kvserve:kv_events_batches_published_total" in text for text in removed)


def test_the_router_serves_the_dashboard_and_each_workers_state(cluster):
    """The page (marked as the router's: it offers a choice of worker) and ?worker=N's own /v1/kv/state,
    as JSON and as a stream, relayed from that worker."""
    page = httpx.get(cluster.router.url + "/dashboard")
    assert page.status_code == 200 and '<body data-router="true">' in page.text
    for i, worker in enumerate(cluster.workers):
        answer = httpx.get(cluster.router.url + f"/v1/kv/state?worker={i}&roots=1", timeout=10)
        assert answer.headers["x-kvserve-worker"] == worker.url
        direct = httpx.get(worker.url + "/v1/kv/state?roots=1", timeout=10).json()
        assert answer.json()["pool"]["num_blocks"] == direct["pool"]["num_blocks"] == 24
        assert answer.json()["model"] == direct["model"]
    with httpx.stream("GET", cluster.router.url + "/v1/kv/state?worker=1&stream=true", timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in stream.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["pool"]["num_blocks"] == 24
    assert httpx.get(cluster.router.url + "/v1/kv/state?worker=7").status_code == 400


def test_a_killed_worker_is_taken_out_and_no_request_hangs(tiny):
    cluster = Cluster(tiny, "least_load", blocks=64)
    try:
        results: list[int | str] = []

        def stream(seed: int) -> None:
            body = {"prompt": ids(30, seed), "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", cluster.router.url + "/v1/completions", json=body, timeout=60) as r:
                    text = "".join(r.iter_text())
                results.append("done" if text.rstrip().endswith("data: [DONE]") else f"cut {r.status_code}")
            except httpx.HTTPError as exc:
                results.append(f"error {exc}")

        threads = [threading.Thread(target=stream, args=(300 + i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        cluster.workers[1].proc.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a request hung"
        # every stream ended with [DONE]: finished, or cut with an in-band error event
        assert results == ["done"] * 6, results
        wait_for(lambda: [w["healthy"] for w in cluster.state()] == [True, False])
        for i in range(4):
            r = complete(cluster.router.url, ids(30, 400 + i))
            assert r.status_code == 200 and r.headers["x-kvserve-worker"] == cluster.workers[0].url
        assert httpx.get(cluster.router.url + "/health").status_code == 200
        # the last worker gone too: 503, at once
        cluster.workers[0].proc.send_signal(signal.SIGKILL)
        wait_for(lambda: httpx.get(cluster.router.url + "/health").status_code == 503)
        r = complete(cluster.router.url, ids(30, 500))
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_worker"
    finally:
        cluster.stop()


def test_serve_with_data_parallel_size_runs_workers_behind_the_router(tiny):
    args = ["--model", tiny, "--max-model-len", "128", "--kv-cache-memory", str(32 * BLOCK_BYTES)]
    server = ServerProcess([*args, "--data-parallel-size", "2", "--policy", "cost"]).start()
    try:
        state = httpx.get(server.url + "/workers").json()
        assert [w["healthy"] and w["kv_events"] for w in state] == [True, True]
        served = {complete(server.url, ids(40, 600 + i)).headers["x-kvserve-worker"] for i in range(6)}
        assert served <= {w["url"] for w in state}
        prefix = ids(48, 700)
        first = complete(server.url, prefix + [9]).headers["x-kvserve-worker"]
        time.sleep(0.5)
        again = complete(server.url, prefix + [10])
        assert again.headers["x-kvserve-worker"] == first
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
    finally:
        assert server.stop() == 0
    for w in state:  # the workers went with it
        with pytest.raises(httpx.HTTPError):
            httpx.get(w["url"] + "/health", timeout=1)


def test_data_parallel_workers_die_with_a_killed_launcher(tiny):
    args = ["--model", tiny, "--max-model-len", "128", "--kv-cache-memory", str(32 * BLOCK_BYTES)]
    server = ServerProcess([*args, "--data-parallel-size", "2"]).start()
    urls = [w["url"] for w in httpx.get(server.url + "/workers").json()]
    server.signal(signal.SIGKILL)
    server.stop()

    def gone(url: str) -> bool:
        try:
            httpx.get(url + "/health", timeout=1)
        except httpx.HTTPError:
            return True
        return False

    wait_for(lambda: all(gone(u) for u in urls), timeout=30)


def test_serve_refuses_routing_options_without_replicas(capsys):
    from kvserve.cli import main

    assert main(["serve", "--policy", "prefix", "--overlap-weight", "2"]) == 2
    assert "--policy, --overlap-weight: routing options, for --data-parallel-size 2 or more" in capsys.readouterr().err
    assert main(["serve", "--data-parallel-size", "0"]) == 2
    assert "--data-parallel-size must be at least 1, got 0" in capsys.readouterr().err
