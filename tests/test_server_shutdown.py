"""Graceful shutdown under load (server/drain.py), on server processes of their own: after SIGTERM the
streams in flight finish whole while new requests get 503 `shutting_down` (the socket stays open, so
clients and load balancers see a refusal, not a refused connection), and the process exits 0; past
--shutdown-timeout what is still running ends with an in-band error and the process exits 0 all the same."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from kvserve.server.launch import ServerProcess

ARGS = ["--kv-cache-memory", "128MiB", "--max-model-len", "2048", "--max-num-seqs", "8", "--log-stats-interval", "0"]


def stream(url: str, max_tokens: int, started: threading.Event) -> tuple[int, bool, str | None]:
    """One streamed completion, one token per chunk: (tokens received, whether [DONE] came, finish reason
    or the code of an in-band error)."""
    body = {"prompt": "Hi", "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "logprobs": 0}
    tokens, done, finish = 0, False, None
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        finish = chunk["error"]["code"]
                        continue
                    tokens += 1
                    finish = chunk["choices"][0]["finish_reason"] or finish
                    started.set()
    except httpx.HTTPError:
        pass  # cut by the server: what arrived is the answer
    finally:
        started.set()
    return tokens, done, finish


def test_drain_finishes_streams_and_refuses_new_requests():
    server = ServerProcess(ARGS).start()
    try:
        with ThreadPoolExecutor(6) as pool:
            started = [threading.Event() for _ in range(6)]
            futures = [pool.submit(stream, server.url, 48, event) for event in started]
            for event in started:
                assert event.wait(120)
            server.signal(signal.SIGTERM)
            time.sleep(0.3)  # the drain begins on the server's next tick (every 0.1 s)
            refused = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["connection"] == "close"
            assert httpx.get(server.url + "/health", timeout=30).status_code == 503
            assert httpx.get(server.url + "/metrics", timeout=30).status_code == 200
            results = [f.result() for f in futures]
        assert results == [(48, True, "length")] * 6  # every stream in flight finished whole
        assert server.proc.wait(30) == 0
        out = server.output()
        assert "draining 6 request(s)" in out, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    finally:
        server.stop()


def test_drain_timeout_cuts_the_rest_and_exits_zero():
    server = ServerProcess([*ARGS, "--shutdown-timeout", "1"]).start()
    try:
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(stream, server.url, 2000, started)  # >= 10 s of decoding on any machine here
            assert started.wait(120)
            signal_time = time.monotonic()
            server.signal(signal.SIGTERM)
            assert server.proc.wait(30) == 0
            exit_after = time.monotonic() - signal_time
            tokens, done, finish = future.result()
        assert exit_after < 6, exit_after  # 1 s of drain, then the engine stops and the stream ends
        assert 0 < tokens < 2000
        assert (done, finish) == (True, "engine_unavailable")  # told why, in-band, and the stream closed
        out = server.output()
        assert "shutdown timeout: ending 1 request(s)" in out, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    finally:
        server.stop()
