"""Server limits and lifecycle, on a second server process: one running request at most, one waiting,
the API key from KVSERVE_API_KEY. (Shutdown under load: test_server_shutdown.py.)"""

from __future__ import annotations

import time

import httpx
import pytest

from kvserve.server.launch import ServerProcess

KEY = "env-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    args = ["--kv-cache-memory", "64MiB", "--max-model-len", "512", "--max-num-seqs", "1"]
    args += ["--max-waiting-requests", "1", "--log-stats-interval", "0"]
    proc = ServerProcess(args, env={"KVSERVE_API_KEY": KEY}).start()
    yield proc
    proc.stop()


def blocks_used(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("kvserve:kv_blocks_used{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no kvserve:kv_blocks_used in /metrics")


def test_env_api_key(server):
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "Hi"}).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=HEADERS, timeout=30)
    assert r.status_code == 200, r.text


def test_queue_full_503(server):
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=LONG) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # running: it has a token
            with client.stream("POST", "/v1/completions", json=LONG) as waiting:
                assert waiting.status_code == 200  # accepted: the headers come once the engine queued it
                r = client.post("/v1/completions", json={**LONG, "stream": False})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "queue_full"
                assert httpx.get(server.url + "/health").status_code == 200
    deadline = time.monotonic() + 10
    while blocks_used(server) != 0:  # both streams were closed: aborted, blocks freed
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=HEADERS, timeout=30)
    assert r.status_code == 200


def test_an_event_whose_text_holds_unicode_line_separators_stays_one_line():
    """Regression (found by the soak): JSON keeps U+2028, U+2029 and U+0085 raw inside strings, and line
    readers built on str.splitlines (httpx's aiter_lines) cut lines at them; sse() escapes them."""
    import json

    from httpx._decoders import LineDecoder  # what aiter_lines uses

    from kvserve.server.protocol import CompletionChoice, CompletionResponse
    from kvserve.server.serving import sse

    text = "a\u2028b\u2029c\x85d é"
    event = CompletionResponse(id="x", model="m", choices=[CompletionChoice(index=0, text=text)])
    lines = [line for line in LineDecoder().decode(sse(event)) if line]
    assert len(lines) == 1 and json.loads(lines[0][len("data: ") :])["choices"][0]["text"] == text
