"""--max-queue-time: a request that waits longer than that without being scheduled ends with 503
queue_timeout (in-band when streamed, the headers being sent), the running request is untouched, and
once the queue is short again requests are served. A tiny model whose steps are slowed to 20 ms and
one running request at a time make the wait certain."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from helpers import save_tiny_model

from kvserve.async_engine import AsyncEngine
from kvserve.config import EngineConfig
from kvserve.engine import Engine
from kvserve.server.app import create_app
from kvserve.server.metrics import ServerMetrics
from kvserve.server.serving import ServerState


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    save_tiny_model(folder, "llama")
    return folder


def test_max_queue_time_is_validated():
    with pytest.raises(ValueError, match="max_queue_time"):
        EngineConfig(max_queue_time=0)


def test_requests_past_the_queue_time_get_503(tiny, monkeypatch):
    async def main():
        ae = AsyncEngine(lambda: Engine(model=tiny, kv_cache_memory="8MiB", max_num_seqs=1, max_queue_time=0.3))
        await asyncio.to_thread(ae.launch)
        ae.attach_loop()
        execute = ae.engine.runner.execute

        def slow_execute(*args, **kwargs):
            time.sleep(0.02)
            return execute(*args, **kwargs)

        monkeypatch.setattr(ae.engine.runner, "execute", slow_execute)
        app = create_app(ServerState(ae, None, "tiny", set(), 128), ServerMetrics("tiny"), None, 1 << 20)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            running = {"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True, "temperature": 0}
            first = asyncio.create_task(client.post("/v1/completions", json=running))
            while not ae.engine.scheduler.running:  # (the ASGI transport returns a response only once it is whole)
                await asyncio.sleep(0.01)
            # the running request holds the only seat for ~2 s from here
            start = time.monotonic()
            r = await client.post("/v1/completions", json={"prompt": [9, 9], "max_tokens": 2})
            waited = time.monotonic() - start
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "queue_timeout"
            assert 0.3 <= waited < 1.5, waited
            r = await client.post("/v1/completions", json={"prompt": [9, 9], "max_tokens": 2, "stream": True})
            assert r.status_code == 200  # accepted, then timed out in the queue: told in-band
            events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            assert [e["error"]["code"] for e in events] == ["queue_timeout"]
            assert r.text.rstrip().endswith("data: [DONE]")
            assert not first.done()
            r = await first
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100  # never noticed
            r = await client.post("/v1/completions", json={"prompt": [9, 9], "max_tokens": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        ae.engine.check_idle()  # every block back: the timed-out requests held none
        await ae.shutdown()

    asyncio.run(main())
