"""AsyncEngine's thread protocol against a fake engine (no model, milliseconds): deltas and results reach the
right channel, a rejected group queues nothing, aborts reach the engine, an idle loop does not spin, and a
dead engine loop fails its requests and turns /health to 503."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import httpx
import pytest

from kvserve.async_engine import AsyncEngine, EngineDeadError, QueueFullError, Submission
from kvserve.outputs import CompletionOutput, RequestMetrics, RequestOutput, SequenceDelta
from kvserve.sampling_params import SamplingParams


class FakeEngine:
    """One token per running request per step; token i of a request is i. `fail_on_step` makes step raise."""

    def __init__(self, max_waiting: int = 100) -> None:
        self.config = SimpleNamespace(log_stats_interval=0, max_waiting_requests=max_waiting, max_queue_time=None)
        self.requests: dict[str, dict] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.fail_on_step = False
        self.scheduler = SimpleNamespace(waiting=[], running=[], num_preemptions=0)
        pool = SimpleNamespace(num_blocks=10, num_free_blocks=10, usage=0.0)
        self.kv = SimpleNamespace(pool=pool, stats=SimpleNamespace(queries=0, hits=0, hit_rate=0.0))
        self.stats = SimpleNamespace(num_generated_tokens=0)

    def add_request(self, prompt, params, request_id, prompt_text=None):
        if prompt == [666]:
            raise ValueError("prompt is cursed")
        self.requests[request_id] = {"prompt": prompt, "params": params, "out": []}
        return request_id

    def has_unfinished(self):
        return any(len(r["out"]) < r["params"].max_tokens for r in self.requests.values())

    def step(self):
        self.steps += 1
        if self.fail_on_step:
            raise RuntimeError("boom")
        deltas = []
        for request_id, r in self.requests.items():
            if len(r["out"]) < r["params"].max_tokens:
                r["out"].append(len(r["out"]))
                done = len(r["out"]) == r["params"].max_tokens
                deltas.append(SequenceDelta(request_id, 0, [r["out"][-1]], "x", None, "length" if done else None))
                self.stats.num_generated_tokens += 1
        return deltas

    def is_finished(self, request_id):
        r = self.requests[request_id]
        return len(r["out"]) == r["params"].max_tokens

    def request_output(self, request_id):
        r = self.requests[request_id]
        seq = CompletionOutput(0, "x" * len(r["out"]), list(r["out"]), finish_reason="length")
        return RequestOutput(request_id, None, r["prompt"], [seq], metrics=RequestMetrics(0.0))

    def pop_finished(self, request_id):
        out = self.request_output(request_id)
        del self.requests[request_id]
        return out

    def abort(self, request_id):
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)


def sub(request_id: str, prompt=(1, 2), max_tokens: int = 3) -> Submission:
    return Submission(request_id, list(prompt), SamplingParams(max_tokens=max_tokens))


async def started(engine: FakeEngine) -> AsyncEngine:
    async_engine = AsyncEngine(lambda: engine)
    async_engine.start()
    return async_engine


def test_deltas_and_outputs():
    async def main():
        fake = FakeEngine()
        ae = await started(fake)
        a, b = await asyncio.gather(
            ae.submit([sub("a", max_tokens=3)]), ae.submit([sub("b1"), sub("b2", max_tokens=5)])
        )
        got = {"a": [], "b1": [], "b2": []}
        for channel in (a, b):
            async for request_id, deltas in channel:
                got[request_id] += [t for d in deltas for t in d.token_ids]
        assert got == {"a": [0, 1, 2], "b1": [0, 1, 2], "b2": [0, 1, 2, 3, 4]}
        assert b.outputs["b2"].outputs[0].token_ids == [0, 1, 2, 3, 4] and not fake.requests
        await ae.shutdown()

    asyncio.run(main())


def test_rejected_group_queues_nothing():
    async def main():
        fake = FakeEngine(max_waiting=100)
        ae = await started(fake)
        with pytest.raises(ValueError, match="cursed"):
            await ae.submit([sub("ok"), sub("bad", prompt=[666])])
        assert fake.aborted == ["ok"] and not fake.requests
        fake.scheduler.waiting = [object()] * 100
        with pytest.raises(QueueFullError):
            await ae.submit([sub("late")])
        fake.scheduler.waiting = []
        channel = await ae.submit([sub("fine", max_tokens=1)])
        async for _ in channel:
            pass
        assert channel.finished
        await ae.shutdown()

    asyncio.run(main())


def test_abort_and_idle():
    async def main():
        fake = FakeEngine()
        ae = await started(fake)
        channel = await ae.submit([sub("long", max_tokens=10**9)])
        async for _ in channel:
            break
        ae.abort(channel)
        deadline = time.monotonic() + 5
        while fake.requests:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert fake.aborted == ["long"]
        steps = fake.steps
        await asyncio.sleep(0.2)
        assert fake.steps == steps  # idle: the engine thread sleeps on its queue
        await ae.shutdown()
        assert not ae.is_alive

    asyncio.run(main())


def test_dead_engine_fails_requests_and_health():
    from kvserve.server.app import create_app
    from kvserve.server.metrics import ServerMetrics
    from kvserve.server.serving import ServerState

    async def main():
        fake = FakeEngine()
        ae = await started(fake)
        state = ServerState(ae, None, "fake", set(), 128)
        app = create_app(state, ServerMetrics("fake"), api_key=None, max_request_bytes=1 << 20)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            fake.fail_on_step = True
            channel = await ae.submit([sub("x")])
            with pytest.raises(EngineDeadError):
                async for _ in channel:
                    pass
            assert not ae.is_alive
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
            r = await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1})
            assert r.status_code == 503
        with pytest.raises(EngineDeadError):
            await ae.submit([sub("y")])

    asyncio.run(main())


def test_client_gone_mid_upload_is_no_server_error(caplog):
    """A client that leaves before its body has arrived (seen in the soak): a 499 for nobody, no 500, no
    traceback in the log."""
    import logging

    from kvserve.server.app import create_app
    from kvserve.server.metrics import ServerMetrics
    from kvserve.server.serving import ServerState

    async def main():
        ae = await started(FakeEngine())
        app = create_app(ServerState(ae, None, "fake", set(), 128), ServerMetrics("fake"), None, 1 << 20)
        incoming = [
            {"type": "http.request", "body": b'{"prompt": [1, 2', "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent = []

        async def receive():
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
        await app(
            {**scope, "http_version": "1.1", "scheme": "http", "server": ("t", 80), "root_path": ""}, receive, send
        )
        await ae.shutdown()
        return sent

    caplog.set_level(logging.INFO, logger="kvserve.server")
    sent = asyncio.run(main())
    assert sent[0]["status"] == 499
    server_log = [r for r in caplog.records if r.name == "kvserve.server"]  # other tests' engine threads log too
    assert server_log and all(r.levelname == "INFO" and r.exc_info is None for r in server_log)
