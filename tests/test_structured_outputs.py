"""Structured outputs (structured_outputs.py) on the default model, offline: sampled outputs (temperature 1)
against JSON schemas, any JSON, a regex, a choice and an EBNF grammar, with n > 1, preemption, prefix-cache
hits and stop strings; bad specs raise ValueError; the sampler's bitmask step is exact."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from helpers import PLOT_TOOL

from kvserve import LLM, SamplingParams
from kvserve.sampler import Sampler, SamplingRow
from kvserve.sampling_params import StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"sku": {"enum": ["A1", "B2", "C3"]}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
    },
    "required": ["id", "items", "paid"],
    "additionalProperties": False,
}
TREE = {
    "type": "object",
    "properties": {
        "label": {"enum": ["root", "node"]},
        "children": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"label": {"type": "string", "maxLength": 8}, "weight": {"type": "number"}},
                "required": ["label", "weight"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["label", "children"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Describe one example as JSON."}]


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory="128MiB")


def sampled(llm, constraint: dict, n: int = 10, max_tokens: int = 160, temperature: float = 1.0, **extra) -> list:
    params = SamplingParams(
        n=n, temperature=temperature, seed=7, max_tokens=max_tokens, structured_outputs=constraint, **extra
    )
    return llm.chat([PROMPT], params, use_tqdm=False)[0].outputs


@pytest.mark.parametrize("schema", [PERSON, ORDER, TREE], ids=["person", "order", "tree"])
def test_sampled_outputs_validate_against_nested_schemas(llm, schema):
    outputs = sampled(llm, {"json": schema})
    assert len(outputs) == 10
    for out in outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    llm.engine.check_idle()


def test_json_object_output_parses(llm):
    """An open object has no end of its own: a vague prompt at temperature 1 keeps adding members, so the
    prompt asks for a small one, at temperature 0.7 (at 1, one sample in eight may still ramble on)."""
    ask = [{"role": "user", "content": "Reply with a JSON object with the keys name and age for Alice, who is 30."}]
    params = SamplingParams(n=8, temperature=0.7, seed=7, max_tokens=200, structured_outputs={"json_object": True})
    for out in llm.chat([ask], params, use_tqdm=False)[0].outputs:
        assert out.finish_reason == "stop", out.text
        assert isinstance(json.loads(out.text), dict)


def test_compact_json_has_no_optional_whitespace(llm):
    """disable_any_whitespace: one space after each comma and colon (xgrammar's separators, as in vLLM),
    nothing else; members in the schema's order."""
    for out in sampled(llm, {"json": PERSON, "disable_any_whitespace": True}, n=4):
        value = json.loads(out.text)
        assert out.text == json.dumps(value, ensure_ascii=False)
        assert list(value) == ["name", "age", "address"]


def test_regex_choice_and_grammar(llm):
    pattern = r"[A-Z][a-z]{2,6} (is|was) [0-9]{1,3}( years old)?"
    for out in sampled(llm, {"regex": pattern}):
        assert re.fullmatch(pattern, out.text), out.text
    choices = ["red", "green", "blue", 'a "quoted" one', "naïve"]
    texts = {out.text for out in sampled(llm, {"choice": choices}, n=16)}
    assert texts <= set(choices) and len(texts) > 1
    grammar = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9]+ | "(" expr ")"'
    for out in sampled(llm, {"grammar": grammar}, max_tokens=60):
        if out.finish_reason == "stop":
            assert re.fullmatch(r"[0-9+()]+", out.text) and out.text.count("(") == out.text.count(")"), out.text


def test_constraints_hold_through_preemption_and_prefix_hits():
    """A KV budget too small for all of them at once preempts running sequences (each keeps its matcher);
    the same prompt again hits the prefix cache; every output still validates."""
    llm = LLM(kv_cache_memory="16MiB", max_num_seqs=16)  # 46 kB of fp32 KV a token: 352 tokens, 22 blocks
    params = SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=100, structured_outputs={"json": ORDER})
    for _ in range(2):
        outputs = llm.chat([PROMPT], params, use_tqdm=False)[0].outputs
        for out in outputs:
            if out.finish_reason == "stop":
                jsonschema.validate(json.loads(out.text), ORDER)
            else:  # cut by max_tokens: a prefix of valid JSON, never invalid text
                assert out.finish_reason == "length"
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.stats.hits > 0
    llm.engine.check_idle()


def test_stop_string_cuts_constrained_output(llm):
    outputs = sampled(llm, {"json": PERSON}, n=3, stop=['"age"'])
    for out in outputs:
        assert out.finish_reason == "stop" and out.stop_reason == '"age"'
        assert '"age"' not in out.text


@pytest.mark.parametrize(
    "constraint, message",
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "json cannot be compiled"),
        ({"regex": "(unclosed"}, "regex cannot be compiled"),
        ({"grammar": "root ::= missing_rule"}, "grammar cannot be compiled"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"choice": []}, "non-empty list"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ],
)
def test_bad_specs_raise_value_error_and_queue_nothing(llm, constraint, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["Hi"], SamplingParams(structured_outputs=constraint), use_tqdm=False)
    llm.engine.check_idle()


def test_grammars_are_compiled_once_per_spec(llm):
    cache = llm.engine.grammars
    spec = StructuredOutputsParams(choice=["x", "y", "z"])
    misses = cache.misses
    first = llm.engine.compile_grammar(spec)
    assert llm.engine.compile_grammar(StructuredOutputsParams(choice=["x", "y", "z"])) is first
    assert cache.misses == misses + 1
    with pytest.raises(ValueError):  # a bad spec's error is cached too: no second compile
        llm.engine.compile_grammar(StructuredOutputsParams(regex="(("))
    with pytest.raises(ValueError):
        llm.engine.compile_grammar(StructuredOutputsParams(regex="(("))
    assert cache.misses == misses + 2


def test_sampler_bitmask_allows_exactly_the_set_bits():
    torch.manual_seed(0)
    vocab = 70  # not a multiple of 32: the last word is partial
    logits = torch.randn(3, vocab)
    allowed_tokens = [[5], [0, 31, 32, 69], list(range(vocab))]
    bitmask = torch.zeros(3, 3, dtype=torch.int32)  # one row per row of logits; the third is not read
    for row, tokens in enumerate(allowed_tokens[:2]):
        for t in tokens:
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    rows = [SamplingRow(SamplingParams(temperature=1.0, logprobs=2), [1], []) for _ in range(3)]
    for _ in range(20):
        out = Sampler()(logits, rows, ([0, 1], bitmask))
        assert out.token_ids[0] == 5 and out.token_ids[1] in allowed_tokens[1]
        assert out.logprobs[0][5] == pytest.approx(torch.log_softmax(logits[0], -1)[5].item())  # raw logprobs
    greedy = [SamplingRow(SamplingParams(temperature=0.0), [1], []) for _ in range(3)]
    out = Sampler()(logits, greedy, ([0, 1], bitmask))
    assert out.token_ids[1] == max(allowed_tokens[1], key=lambda t: logits[1, t].item())
    assert out.token_ids[2] == logits[2].argmax().item()  # an unconstrained row is untouched


def test_bitmask_paths_agree():
    """xgrammar's CPU loop (float32 on the CPU) and the tensor path (anything else) mask the same tokens."""
    from kvserve.sampler import _apply_token_bitmask

    gen = torch.Generator().manual_seed(0)
    work = torch.randn(3, 70, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32, generator=gen)
    fast, plain = work.clone(), work.double()
    _apply_token_bitmask(fast, [0, 2], bitmask)
    _apply_token_bitmask(plain, [0, 2], bitmask)
    assert torch.equal(fast.isinf(), plain.isinf())
    assert torch.equal(fast[1], work[1])  # a row not listed is untouched
    expected = [(int(bitmask[0, t // 32]) >> (t % 32)) & 1 == 0 for t in range(70)]
    assert fast[0].isinf().tolist() == expected


def test_required_tool_calls_with_schema_references_compile(llm):
    """The array of calls that tool_choice "required" builds keeps "#/$defs/..." resolvable (server/tools.py)."""
    from kvserve.server.protocol import ChatCompletionRequest
    from kvserve.server.tools import plan_tools

    req = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "plot"}],
            "tools": [PLOT_TOOL],
            "tool_choice": "required",
            "parallel_tool_calls": False,  # one call: the greedy answer would otherwise repeat it
        }
    )
    constraint = plan_tools(req, None).constraint
    llm.engine.compile_grammar(StructuredOutputsParams(**constraint))  # raises ValueError if it did not compile
    out = llm.chat(
        [PROMPT], SamplingParams(temperature=0, max_tokens=60, structured_outputs=constraint), use_tqdm=False
    )
    calls = json.loads(out[0].outputs[0].text)
    assert len(calls) == 1 and calls[0]["name"] == "plot" and isinstance(calls[0]["parameters"]["p"]["x"], int)
