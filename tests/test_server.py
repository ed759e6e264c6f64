"""The OpenAI-compatible server, as a real process on a free port, through the `openai` client and httpx.

One server for the module (loading the model takes ~10 s on this CPU); every request is small. Tests run
in order and share it, so each asserts only about its own requests (block counts return to 0 between them).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time

import httpx
import jsonschema
import openai
import pytest
from helpers import PLOT_PARAMETERS, POINT_SCHEMA
from prometheus_client.parser import text_string_to_metric_families

from kvserve.kv.prefix_hash import extend_block_hashes
from kvserve.server.launch import ServerProcess

KEY = "test-key"
MODEL = "smollm"
MAX_MODEL_LEN = 1024
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server():
    args = ["--kv-cache-memory", "128MiB", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", KEY]
    args += ["--served-model-name", MODEL, "--max-request-bytes", str(MAX_REQUEST_BYTES), "--log-stats-interval", "1"]
    args += ["--tool-call-parser", "hermes"]
    proc = ServerProcess(args).start()
    yield proc
    code = proc.stop()
    output = proc.output()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    os.unlink(proc.log.name)  # kept when an assertion above fails, for the post-mortem


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return httpx.post(server.url + path, content=body, headers=headers, timeout=timeout)


def metrics(server) -> dict[str, float]:
    """name{label=value,...} (model_name left out) -> value."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(server, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["kvserve:kv_blocks_used"] == 0 and m["kvserve:num_requests_running"] == 0:
            return m
        assert time.monotonic() < deadline, f"blocks not freed: {m['kvserve:kv_blocks_used']}"
        time.sleep(0.05)


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


# ---------------------------------------------------------------- basics


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, **GREEDY)
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == 5 and r.usage.total_tokens == 11
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    again = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, **GREEDY)
    assert again.choices[0].text == r.choices[0].text


def test_completion_stream_matches(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, **GREEDY)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_multiple_prompts_and_token_ids(client):
    r = client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=3, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 6
    ids = client.completions.create(model=MODEL, prompt=[[19556, 28], [957, 1462, 314]], max_tokens=2, **GREEDY)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5


def test_stream_many_prompts_and_n(client):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=["Hello", "Goodbye"],
            n=2,
            max_tokens=3,
            stream=True,
            temperature=1.0,
            seed=5,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    finished = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert finished == {0: "length", 1: "length", 2: "length", 3: "length"}
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == 3


def test_chat(client):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **GREEDY)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 8
    stream = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_completion_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content
    assert stream[-1].usage.completion_tokens == 8 and stream[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_n_and_seed(client):
    kw = dict(model=MODEL, prompt="My favourite colour is", max_tokens=8, temperature=1.0, seed=1234)
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    c = client.completions.create(n=1, **{**kw, "seed": 99})
    d = client.completions.create(n=1, **{**kw, "seed": 99})
    assert c.choices[0].text == d.choices[0].text
    chat = [
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=1.0, seed=7, n=2
        )
        for _ in range(2)
    ]
    assert [x.message.content for x in chat[0].choices] == [x.message.content for x in chat[1].choices]


def test_stop(client):
    prompt = "List three fruits:"
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, **GREEDY).choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stop=[stop], temperature=0)
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- logprobs and echo


def test_completion_logprobs_shape(client):
    r = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=5, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0 and 3 <= len(top) <= 4 and top[token] == token_lp
        assert max(top.values()) == token_lp  # greedy: the chosen token is the most likely
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_echo_prompt_logprobs(client):
    prompt = "The quick brown fox jumps"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = r.choices[0]
    assert choice.text == prompt and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens == len(lp.token_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and "".join(lp.tokens) == prompt
    # with generated tokens after the prompt, streamed, as lm-eval's scoring reads it
    streamed = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1, stream=True, **GREEDY
        )
    )
    tokens = [t for c in streamed for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == r.usage.prompt_tokens + 2
    assert "".join(c.choices[0].text for c in streamed).startswith(prompt)
    assert streamed[0].choices[0].logprobs.token_logprobs[1:5] == lp.token_logprobs[1:5]


def test_lm_eval_style_batch(server):
    body = {
        "model": MODEL,
        "prompt": [[504, 3458, 28], [19556, 28, 957, 1462]],
        "max_tokens": 0,
        "echo": True,
        "logprobs": 1,
        "temperature": 0,
        "seed": 1234,
    }
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [len(c["logprobs"]["tokens"]) for c in choices] == [3, 4]
    assert all(c["logprobs"]["token_logprobs"][0] is None for c in choices)


def test_cached_tokens(server, client):
    ids = list(range(2000, 2080))  # 80 tokens no other test uses: 4 full blocks are cacheable
    before = metrics(server)
    first = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0)
    second = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 64  # one token short of the prompt, whole blocks
    after = metrics(server)
    assert after["kvserve:prefix_cache_hits_total"] - before["kvserve:prefix_cache_hits_total"] >= 64
    assert after["kvserve:prefix_cache_queries_total"] - before["kvserve:prefix_cache_queries_total"] >= 160


# ---------------------------------------------------------------- errors


def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", "{not json", None),
        ("/v1/completions", "[1, 2]", None),
        ("/v1/completions", {**COMPLETION, "max_tokens": "ten"}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "temperature": -0.5}, "temperature"),
        ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
        ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
        ("/v1/completions", {**COMPLETION, "n": 129}, "n"),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
        ("/v1/completions", {**COMPLETION, "stop": 5}, "stop"),
        ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, 2, 10**9]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": list(range(MAX_MODEL_LEN + 1))}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": "word " * (MAX_MODEL_LEN + 10)}, "prompt"),
        ("/v1/completions", {**COMPLETION, "max_tokens": MAX_MODEL_LEN}, None),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": "hello"}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "stream": "maybe"}, "stream"),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ],
)
def test_bad_request(server, path, body, param):
    _error(post(server, path, body), 400, param)


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("/v1/completions", "guided_decoding_backend", "xgrammar"),
        ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ],
)
def test_unimplemented_fields_are_refused_by_name(server, path, field, value):
    """A field the server does not implement is a 400 that names it, never accepted and ignored."""
    body = {**(CHAT if "chat" in path else COMPLETION), field: value}
    error = _error(post(server, path, body), 400, field)
    assert error["code"] == "unsupported_parameter"
    assert error["message"] == f"{field}: this server does not support the field {field!r}"


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "array", "maxItems": 3, "items": {"enum": ["mon", "tue", "wed"]}},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


def test_structured_outputs_on_both_endpoints(server, client):
    """response_format (json_schema, json_object) on chat and completions, vLLM's structured_outputs
    and guided_choice: every sampled answer follows its constraint, streamed or not."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT["messages"], max_tokens=120, n=4, seed=1, response_format=fmt
    )
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT["messages"], max_tokens=120, seed=1, response_format=fmt, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    prompt = 'Alice is 30. As JSON: {"name": "Alice", "age": 30}. Bob is 41. As JSON:'
    completion = client.completions.create(  # an open object: temperature 0.7, or a sample may ramble on
        model=MODEL,
        prompt=prompt,
        max_tokens=150,
        seed=2,
        n=3,
        temperature=0.7,
        extra_body={"response_format": {"type": "json_object"}},
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop" and isinstance(json.loads(choice.text), dict)
    for extra in ({"structured_outputs": {"choice": ["yes", "no"]}}, {"guided_choice": ["yes", "no"]}):
        out = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=5, n=6, seed=3, extra_body=extra)
        assert {c.text for c in out.choices} <= {"yes", "no"}
    regex = client.chat.completions.create(
        model=MODEL, messages=CHAT["messages"], max_tokens=12, extra_body={"structured_outputs": {"regex": "[0-9]{4}"}}
    )
    assert re.fullmatch("[0-9]{4}", regex.choices[0].message.content)
    wait_idle(server)


@pytest.mark.parametrize(
    "extra, param, message",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
            "structured_outputs",
            "cannot be compiled",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", None),
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs", "cannot be compiled"),
        ({"structured_outputs": {"grammar": "root ::= nope"}}, "structured_outputs", "cannot be compiled"),
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", None),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "structured_outputs", "one constraint"),
    ],
)
def test_bad_structured_outputs_are_400s(server, extra, param, message):
    error = _error(post(server, "/v1/chat/completions", {**CHAT, **extra}), 400, param)
    if message:
        assert message in error["message"]
    wait_idle(server)


def test_logit_bias(server):
    """+100 on one token makes greedy decoding repeat it (a completion and a chat alike); keys that are
    not token ids, or out of the vocabulary, or biases outside [-100, 100] are 400s naming logit_bias."""

    def text(path: str, base: dict, max_tokens: int) -> str:
        body = {**base, "max_tokens": max_tokens, "temperature": 0, "logit_bias": {"28": 100}, "ignore_eos": True}
        r = post(server, path, body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == max_tokens
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]

    for path, base in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        piece = text(path, base, 1)
        assert piece and text(path, base, 4) == piece * 4
    for bias in ({"x": 1}, {"28": 101}, {"99999999": 1}):
        _error(post(server, "/v1/completions", {**COMPLETION, "logit_bias": bias}), 400, "logit_bias")


def test_tokenize_and_detokenize(server):
    """/tokenize counts what a completion or a chat would see as its prompt (their usage.prompt_tokens),
    /detokenize gives the text back; vLLM's shapes."""
    text = "The capital of France is"
    r = post(server, "/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["max_model_len"] == MAX_MODEL_LEN and body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert "".join(body["token_strs"]) == text
    usage = post(server, "/v1/completions", {**COMPLETION, "prompt": text, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]
    assert post(server, "/detokenize", {"tokens": body["tokens"]}).json() == {"prompt": text}
    assert post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}

    chat = post(server, "/tokenize", {"messages": CHAT["messages"]}).json()
    assert chat["token_strs"] is None
    usage = post(server, "/v1/chat/completions", CHAT).json()["usage"]
    assert usage["prompt_tokens"] == chat["count"]
    rendered = post(server, "/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")

    _error(post(server, "/tokenize", {"prompt": text, "messages": CHAT["messages"]}), 400, "prompt")
    _error(post(server, "/tokenize", {}), 400, "prompt")
    _error(post(server, "/tokenize", {"prompt": text, "tools": []}), 400, "tools")
    _error(post(server, "/tokenize", {"prompt": text, "model": "other"}), 404, "model")
    _error(post(server, "/detokenize", {"tokens": [1, 10**9]}), 400, "tokens")
    _error(post(server, "/detokenize", {"tokens": ["a"]}), 400, "tokens")
    assert post(server, "/tokenize", {"prompt": text}, key=None).status_code == 401


def test_continue_final_message(server):
    """vLLM's continue_final_message: the assistant's last message stays open and generation continues
    it (no end-of-turn, no new assistant header); with add_generation_prompt as well it is a 400."""
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]
    options = {"continue_final_message": True, "add_generation_prompt": False}
    rendered = post(server, "/tokenize", {"messages": messages, **options}).json()
    text = post(server, "/detokenize", {"tokens": rendered["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nThe capital of France is")
    r = post(
        server, "/v1/chat/completions", {**CHAT, "messages": messages, **options, "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == rendered["count"]
    assert r.json()["choices"][0]["message"]["content"].startswith(" Paris")
    _error(post(server, "/v1/chat/completions", {**CHAT, "messages": messages, "continue_final_message": True}), 400)
    clash = {**CHAT, "chat_template_kwargs": {"continue_final_message": True}}
    error = _error(post(server, "/v1/chat/completions", clash), 400, "chat_template_kwargs")
    assert "may not set ['continue_final_message']" in error["message"]
    _error(post(server, "/tokenize", {"messages": messages, "chat_template_kwargs": {"tokenize": True}}), 400)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 12}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _streamed_calls(stream) -> tuple[list[tuple[str, str]], str | None]:
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, ["", ""])
                entry[0] += call.function.name or ""
                entry[1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish


def test_tool_calls_required_and_named(server, client):
    """required and named calls follow the tools' schemas, streamed arguments equal the non-streamed ones,
    and a role "tool" reply then gets a normal answer."""
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice in ("required", named):
        kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0)
        reply = client.chat.completions.create(**kwargs)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls
        for call in message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if choice is named:
            assert [c.function.name for c in message.tool_calls] == ["get_time"]
        streamed, finish = _streamed_calls(client.chat.completions.create(**kwargs, stream=True))
        assert finish == "tool_calls"
        assert streamed == [(c.function.name, c.function.arguments) for c in message.tool_calls]
    call = message.tool_calls[0]
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"time": "14:05"}'},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    auto_kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=24, temperature=0)
    auto = client.chat.completions.create(**auto_kwargs).choices[0]
    assert auto.finish_reason in ("stop", "length", "tool_calls")  # hermes parses whatever came
    chunks = list(client.chat.completions.create(**auto_kwargs, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == (auto.message.content or "")
    if auto.message.content and len(auto.message.content.strip()) > 10:
        assert len(pieces) > 2  # the content streamed as it came, not held to the end
    streamed, finish = _streamed_calls(iter(chunks))
    assert finish == auto.finish_reason
    assert streamed == [(c.function.name, c.function.arguments) for c in auto.message.tool_calls or []]
    wait_idle(server)


@pytest.mark.parametrize(
    "extra, param, message",
    [
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools", None),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", None),
        ({"tool_choice": "required"}, "tool_choice", None),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", None),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", None),
        ({"tools": TOOLS, "tool_choice": "required", "guided_choice": ["a"]}, "tool_choice", "combined"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "combined",
        ),
        (  # a malformed constraint beside a required call: a 400, not a 500
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
            },
            "response_format",
            "needs json_schema.schema",
        ),
    ],
)
def test_bad_tool_requests_are_400s(server, extra, param, message):
    error = _error(post(server, "/v1/chat/completions", {**CHAT, **extra}), 400, param)
    if message:
        assert message in error["message"]


def test_tokenizer_info(server):
    r = httpx.get(server.url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["tokenizer_class"] and info["eos_token"] == "<|im_end|>"  # the class: transformers' (version-dependent)
    assert info["model_max_length"] == MAX_MODEL_LEN and "<|im_start|>" in info["chat_template"]
    assert info["added_tokens_decoder"]["2"] == {"content": "<|im_end|>", "special": True}
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401


def test_kv_cache_info_gives_a_router_the_hash_chain_and_the_blocks(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    info = httpx.get(server.url + "/kv_cache", headers=auth).json()
    assert info["block_size"] == 16 and info["prefix_caching"] and info["kv_events"] is None and info["tiers"] == []
    prompt = list(range(1000, 1040))  # 2 full blocks + 8 tokens
    assert post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1}).status_code == 200
    chain: list[bytes] = []
    extend_block_hashes(chain, bytes.fromhex(info["root_hash"]), lambda a, b: prompt[a:b], len(prompt), 16)
    blocks = httpx.get(server.url + "/kv_cache/blocks", headers=auth).json()
    assert {h.hex() for h in chain} <= set(blocks["device"]) and set(blocks) == {"device"}
    assert httpx.get(server.url + "/kv_cache").status_code == 401


# ---------------------------------------------------------------- /v1/responses


def _sse_events(r: httpx.Response) -> list[dict]:
    """The typed events of a Responses stream; each `event:` line names its data's type."""
    events = []
    for block in r.text.strip().split("\n\n"):
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        events.append(json.loads(data[len("data: ") :]))
        assert events[-1]["type"] == kind[len("event: ") :]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_responses_is_the_chat_it_translates_to(server, client):
    """instructions + input run as the chat with a system message would: the same text and token counts,
    as the openai client's Response (checked strictly); streamed, the deltas add up to it; cut by
    max_output_tokens, the response is incomplete."""
    from openai.types.responses import Response as OpenAIResponse

    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    body = {"model": MODEL, "instructions": "Answer in one word.", "max_output_tokens": 12, "temperature": 0}
    body["input"] = [{"role": "user", "content": [{"type": "input_text", "text": "Capital of Italy?"}]}]
    r = post(server, "/v1/responses", body)
    assert r.status_code == 200, r.text
    response = OpenAIResponse.model_validate(r.json())
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    finished = chat.choices[0].finish_reason == "stop"
    assert response.status == ("completed" if finished else "incomplete")
    assert (response.incomplete_details is None) == finished

    events = _sse_events(post(server, "/v1/responses", {**body, "stream": True}))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if finished else "response.incomplete",
    ]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == events[-4]["text"] == response.output_text
    assert OpenAIResponse.model_validate(events[-1]["response"]).output_text == response.output_text

    short = client.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=3, temperature=0)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 3
    wait_idle(server)


def test_responses_tools_and_text_format(server, client):
    """Flat function tools: a required call validates against its schema, streamed or not; the call and
    its output passed back as input items get an answer; "auto" streams what the whole answer holds;
    text.format json_schema gives valid JSON."""
    from openai.types.responses import Response as OpenAIResponse

    tool = {"type": "function", "name": "plot", "parameters": PLOT_PARAMETERS}
    ask = "Plot the point x=3."
    called = client.responses.create(model=MODEL, input=ask, tools=[tool], tool_choice="required", temperature=0)
    (call,) = called.output
    assert call.type == "function_call" and call.name == "plot" and called.status == "completed"
    jsonschema.validate(json.loads(call.arguments), PLOT_PARAMETERS)
    named = {"type": "function", "name": "plot"}
    streamed = post(
        server,
        "/v1/responses",
        {"model": MODEL, "input": ask, "tools": [tool], "tool_choice": named, "temperature": 0, "stream": True},
    )
    done = [e for e in _sse_events(streamed) if e["type"] == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0]["name"] == "plot"
    jsonschema.validate(json.loads(done[0]["arguments"]), PLOT_PARAMETERS)

    history = [{"role": "user", "content": ask}, call.model_dump(exclude_none=True)]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "plotted"})
    answer = client.responses.create(model=MODEL, input=history, tools=[tool], max_output_tokens=16, temperature=0)
    assert answer.output[0].type == "message" and answer.output_text

    auto = {"model": MODEL, "input": ask, "tools": [tool], "max_output_tokens": 16, "temperature": 0}
    whole = OpenAIResponse.model_validate(post(server, "/v1/responses", auto).json())
    events = _sse_events(post(server, "/v1/responses", {**auto, "stream": True}))
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == whole.output_text
    final = OpenAIResponse.model_validate(events[-1]["response"])
    assert [(o.type, getattr(o, "arguments", None)) for o in final.output] == [
        (o.type, getattr(o, "arguments", None)) for o in whole.output
    ]

    fmt = {"type": "json_schema", "name": "point", "schema": POINT_SCHEMA, "strict": True}
    shaped = client.responses.create(
        model=MODEL, input="A point, please.", text={"format": fmt}, temperature=0, max_output_tokens=40
    )
    jsonschema.validate(json.loads(shaped.output_text), POINT_SCHEMA)
    wait_idle(server)


def test_responses_errors(server):
    base = {"model": MODEL, "input": "hi"}
    assert (
        _error(post(server, "/v1/responses", {**base, "store": True}), 400, "store")["code"] == "unsupported_parameter"
    )
    _error(post(server, "/v1/responses", {**base, "previous_response_id": "resp_1"}), 400, "previous_response_id")
    _error(post(server, "/v1/responses", {**base, "include": ["message.output_text.logprobs"]}), 400, "include")
    _error(post(server, "/v1/responses", {**base, "reasoning": {"effort": "low"}}), 400, "reasoning")
    _error(post(server, "/v1/responses", {**base, "truncation": "auto"}), 400, "truncation")
    for bad_input in (
        [],
        [{"type": "reasoning", "summary": []}],
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}],
        [{"role": "user", "content": "hi", "name": "someone"}],
        [{"type": "function_call_output", "call_id": "c1"}],
    ):
        _error(post(server, "/v1/responses", {**base, "input": bad_input}), 400, "input")
    _error(post(server, "/v1/responses", {**base, "text": {"format": {"type": "json_schema"}}}), 400, "text.format")
    _error(post(server, "/v1/responses", {**base, "input": "x " * (MAX_MODEL_LEN + 10)}), 400, "input")
    _error(post(server, "/v1/responses", {**base, "model": "gpt-4"}), 404, "model")
    assert post(server, "/v1/responses", {**base, "store": False, "max_output_tokens": 2}).status_code == 200
    wait_idle(server)


def test_embeddings(server, client):
    """The openai client (base64 by default) and float JSON agree; each vector is unit-length and the
    model's hidden size; token ids embed as their text does; the same input gives the same vector in
    batch; different inputs give different vectors. Across batches, 1e-4: the kernels' fp32 sums
    depend on how many rows a step has (row-wise or panel products)."""
    texts = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force."]
    result = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in result.data] == [0, 1]
    assert result.usage.prompt_tokens == result.usage.total_tokens > 10
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == 576 and abs(math.fsum(x * x for x in v) - 1) < 1e-5 for v in vectors)
    assert math.fsum(a * b for a, b in zip(*vectors)) < 0.999  # two texts, two directions
    r = post(server, "/v1/embeddings", {"model": MODEL, "input": texts[1], "encoding_format": "float"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    assert max(abs(a - b) for a, b in zip(body["data"][0]["embedding"], vectors[1])) < 1e-4
    ids = post(server, "/tokenize", {"model": MODEL, "prompt": texts[0]}).json()["tokens"]
    by_ids = client.embeddings.create(model=MODEL, input=[ids, ids], dimensions=576).data
    assert max(abs(a - b) for a, b in zip(by_ids[0].embedding, vectors[0])) < 1e-4
    assert by_ids[0].embedding == by_ids[1].embedding
    wait_idle(server)


def test_embedding_errors(server):
    base = {"model": MODEL, "input": "hello"}
    assert (
        "hidden size (576)"
        in _error(post(server, "/v1/embeddings", {**base, "dimensions": 64}), 400, "dimensions")["message"]
    )
    _error(post(server, "/v1/embeddings", {**base, "input": []}), 400, "input")
    _error(post(server, "/v1/embeddings", {**base, "input": ["ok", ""]}), 400, "input")
    too_long = _error(post(server, "/v1/embeddings", {**base, "input": [5] * (MAX_MODEL_LEN + 1)}), 400, "input")
    assert too_long["code"] == "context_length_exceeded"
    assert "49152" in _error(post(server, "/v1/embeddings", {**base, "input": [1, 10**6]}), 400, "input")["message"]
    _error(post(server, "/v1/embeddings", {**base, "encoding_format": "int8"}), 400, "encoding_format")
    _error(post(server, "/v1/embeddings", {**base, "truncate": True}), 400, "truncate")
    _error(post(server, "/v1/embeddings", {**base, "model": "gpt-4"}), 404, "model")
    wait_idle(server)


def test_hostile_input_limits(server):
    """Per-request limits hostile input hits, each a 400 naming the field, and the server unharmed."""
    nested = '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}"  # 10 KB, past Python's JSON recursion limit
    assert _error(post(server, "/v1/completions", nested), 400)["code"] == "invalid_json"
    cases = [
        ({"n": 129}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": MAX_MODEL_LEN}, "prompt"),  # prompt + max_tokens past the context
        ({"prompt": [5] * (MAX_MODEL_LEN + 1)}, "prompt"),
        ({"stop": [f"s{i}" for i in range(65)]}, "stop"),
        ({"stop": ["x" * 1025]}, "stop"),
        ({"logit_bias": {"49152": 1}}, "logit_bias"),
    ]
    for fields, param in cases:
        assert "message" in _error(post(server, "/v1/completions", {**COMPLETION, **fields}), 400, param)
    at_the_limits = {**COMPLETION, "stop": [f"{i:02d}" for i in range(63)] + ["x" * 1024]}
    assert post(server, "/v1/completions", at_the_limits).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    wait_idle(server)


def test_fuzzing_findings_stay_fixed(server):
    """What schemathesis found (tests/test_fuzz.py): a 405 without Allow, lax booleans, and chat messages
    whose extra or mistyped fields were accepted (or, with tool_calls, replaced by "")."""
    r = httpx.request("TRACE", server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    _error(post(server, "/v1/responses", {"model": MODEL, "input": "hi", "store": 0}), 400, "store")
    _error(post(server, "/v1/completions", {**COMPLETION, "echo": 1}), 400, "echo")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for message in (
        {"role": "tool", "content": "x", "tool_call_id": {}},
        {"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]},
        {"role": "assistant", "content": None, "tool_calls": [{**call, "type": "other"}]},
        {"role": "assistant", "content": {}, "tool_calls": [call]},
        {"role": "system", "content": None, "tool_calls": []},
    ):
        _error(post(server, "/v1/chat/completions", {**CHAT, "messages": [message]}), 400, "messages")


def test_user_field_is_accepted(server):
    """OpenAI's `user` only identifies the caller's end user: accepted, no effect."""
    assert post(server, "/v1/chat/completions", {**CHAT, "user": "someone"}).status_code == 200


def test_auth_model_and_size_errors(server):
    assert _error(post(server, "/v1/completions", COMPLETION, key=None), 401)["code"] == "invalid_api_key"
    _error(post(server, "/v1/completions", COMPLETION, key="wrong"), 401)
    _error(httpx.get(server.url + "/v1/models"), 401)
    assert _error(post(server, "/v1/completions", {**COMPLETION, "model": "gpt-4"}), 404, "model")["code"]
    _error(post(server, "/v1/chat/completions", {**CHAT, "model": "gpt-4"}), 404, "model")
    _error(post(server, "/v1/completions", {**COMPLETION, "prompt": "x" * MAX_REQUEST_BYTES}), 413)
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    # nothing was disturbed: the engine is alive and serves
    assert httpx.get(server.url + "/health").status_code == 200
    assert post(server, "/v1/completions", COMPLETION).status_code == 200


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi", max_tokens=1)


# ---------------------------------------------------------------- disconnects, concurrency, metrics


def test_stream_disconnect_frees_blocks(server):
    before = wait_idle(server)
    body = {**COMPLETION, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            assert next(line for line in lines if line.startswith("data: "))
        assert metrics(server)["kvserve:kv_blocks_used"] > 0
    after = wait_idle(server)  # closing the stream aborted the request
    aborted = "kvserve:request_success_total{finished_reason=abort}"
    assert after[aborted] - before.get(aborted, 0) == 1


def test_non_stream_disconnect_frees_blocks(server):
    wait_idle(server)
    body = {**COMPLETION, "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=1.5)
    wait_idle(server)


def test_64_concurrent_streams_exact_counts(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, int, str]:
        want = 3 + i % 6
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Request number {i} says",
            max_tokens=want,
            stream=True,
            logprobs=0,
            stream_options={"include_usage": True},
            temperature=0.7,
            seed=i,
            extra_body={"ignore_eos": True},
        )
        streamed, usage, finish = 0, None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                streamed += len(choice.logprobs.tokens)
                finish = choice.finish_reason or finish
        return want, streamed, usage, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    results = asyncio.run(main())
    assert all(want == streamed == usage and finish == "length" for want, streamed, usage, finish in results), results
    wait_idle(server)


def test_metrics_move(server, client):
    before = metrics(server)
    for name in (
        "num_requests_waiting",
        "kv_blocks_total",
        "kv_cache_usage_ratio",
        "num_preemptions_total",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "inter_token_latency_seconds_count",
    ):
        assert f"kvserve:{name}" in before, name
    assert before["kvserve:kv_blocks_total"] > 0
    client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=5, **GREEDY)
    after = metrics(server)
    assert after["kvserve:generation_tokens_total"] - before["kvserve:generation_tokens_total"] == 5
    assert after["kvserve:prompt_tokens_total"] - before["kvserve:prompt_tokens_total"] == 6
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert after[f"kvserve:{name}_count"] == before[f"kvserve:{name}_count"] + 1
    assert after["kvserve:inter_token_latency_seconds_count"] == before["kvserve:inter_token_latency_seconds_count"] + 4


def test_logs(server):
    out = server.output()
    assert "request cmpl-" in out and "TTFT" in out and "finish length" in out
    assert "engine: running" in out and "prefix cache hit rate" in out


def test_bench_client(server, tmp_path):
    from kvserve.bench import bench_namespace, cmd_bench_serve

    args = bench_namespace(
        base=server.url,
        api_key=KEY,
        num_requests=4,
        prompt_len=16,
        output_len=4,
        concurrency=2,
        shared_prefix_len=8,
        plot=str(tmp_path / "bench.png"),
        json=str(tmp_path / "bench.json"),
    )
    assert cmd_bench_serve(args) == 0
    summary = json.loads((tmp_path / "bench.json").read_text())["summary"]
    assert summary["completed"] == 4 and summary["failed"] == 0 and summary["output_tokens"] == 16
    assert summary["ttft_p50_ms"] > 0 and summary["itl_p99_ms"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    args = bench_namespace(
        base=server.url,
        api_key=KEY,
        num_requests=3,
        output_len=3,
        request_rate=50.0,
        endpoint="chat",
        json=str(tmp_path / "chat.json"),
    )
    assert cmd_bench_serve(args) == 0
    assert json.loads((tmp_path / "chat.json").read_text())["summary"]["output_tokens"] == 9
