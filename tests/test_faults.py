"""Fault injection: a step that raises (in the model, the sampler or a detokenizer) fails the requests of
that step alone; the engine stays consistent (blocks freed) and serves on; the requests that were not in
the step finish as they would have. Through the server: the failed request gets a 500 naming the
failure (in-band when streamed), the others 200; steps that fail MAX_FAILED_STEPS times in a row turn
/health to 503. A tokenizer that raises on one prompt fails that request alone."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from helpers import save_tiny_model

from kvserve import LLM, SamplingParams
from kvserve.async_engine import MAX_FAILED_STEPS, AsyncEngine
from kvserve.engine import Engine, StepFailed
from kvserve.tokenizer import IncrementalDetokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 3, 7, 250]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    save_tiny_model(folder, "llama")
    return folder


def fail_once(monkeypatch, target, name: str, when=lambda *a, **k: True) -> list[int]:
    """Makes target.name raise RuntimeError("injected") the first time `when` holds for its arguments."""
    original = getattr(target, name)
    fired: list[int] = []

    def wrapper(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(1)
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return fired


@pytest.mark.parametrize("where", ["model", "sampler", "detokenizer"])
def test_a_failed_step_fails_its_requests_alone(tiny, monkeypatch, where):
    model = None if where == "detokenizer" else tiny  # the tiny model has no tokenizer: the default model
    reference = [o.outputs[0].token_ids for o in LLM(model, kv_cache_memory="32MiB").generate(PROMPTS, GREEDY)]
    engine = Engine(model=model, kv_cache_memory="32MiB", max_num_seqs=1)  # one request per step
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.step()  # the first request's prefill (and first token)
    target, name = {
        "model": (engine.runner, "execute"),
        "sampler": (engine, "sampler"),
        "detokenizer": (IncrementalDetokenizer, "add_token"),
    }[where]
    fired = fail_once(monkeypatch, target, name)
    with pytest.raises(StepFailed) as failure:
        engine.step()
    assert fired and list(failure.value.outputs) == [ids[0]] and "injected" in str(failure.value)
    assert ids[0] not in engine.groups  # aborted, its blocks freed
    outputs = {}
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.finish_reason is not None:
                outputs[delta.request_id] = engine.pop_finished(delta.request_id).outputs[0].token_ids
    assert [outputs[i] for i in ids[1:]] == reference[1:]
    engine.check_idle()


def test_failed_steps_through_the_server(tiny, monkeypatch):
    """One failed step: its request a 500 (streamed: an in-band error), the others 200. Then every step
    fails: after MAX_FAILED_STEPS in a row the engine is declared broken and /health is 503."""
    from kvserve.server.app import create_app
    from kvserve.server.metrics import ServerMetrics
    from kvserve.server.serving import ServerState

    class PoisonTokenizer:  # a tokenizer that raises on one prompt
        vocab_size = 320
        has_chat_template = False

        def encode(self, text, add_special_tokens=True):
            if "poison" in text:
                raise RuntimeError("tokenizer exploded")
            return [5 + len(word) for word in text.split()]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    async def main():
        ae = AsyncEngine(lambda: Engine(model=tiny, kv_cache_memory="8MiB"))
        await asyncio.to_thread(ae.launch)
        ae.attach_loop()
        state = ServerState(ae, PoisonTokenizer(), "tiny", set(), 128)
        app = create_app(state, ServerMetrics("tiny"), api_key=None, max_request_bytes=1 << 20)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
            assert (await client.post("/v1/completions", json={**body, "prompt": "a poison pill"})).status_code == 500
            assert (await client.post("/v1/completions", json=body)).status_code == 200

            fired = fail_once(monkeypatch, ae.engine, "sampler")
            r = await client.post("/v1/completions", json=body)
            assert fired and r.status_code == 500 and r.json()["error"]["code"] == "engine_step_failed"
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200 and (await client.get("/health")).status_code == 200

            fail_once(monkeypatch, ae.engine, "sampler")
            r = await client.post("/v1/completions", json={**body, "stream": True})
            assert r.status_code == 200 and '"code": "engine_step_failed"' in r.text

            def always(*args, **kwargs):
                raise RuntimeError("the model is broken")

            monkeypatch.setattr(ae.engine.runner, "execute", always)
            for _ in range(MAX_FAILED_STEPS):
                assert (await client.post("/v1/completions", json=body)).status_code in (500, 503)
            assert (await client.get("/health")).status_code == 503
            assert (await client.post("/v1/completions", json=body)).status_code == 503
        await ae.shutdown()

    asyncio.run(main())
