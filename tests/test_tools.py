"""Tool calling's pure parts (server/tools.py): the hermes and llama3_json parsers on text with zero, one or
two calls and text before a call, streaming "auto" answers, the enforced forms' constraints, and the
plan's refusals."""

from __future__ import annotations

import json

import pytest
from helpers import PLOT_PARAMETERS, PLOT_TOOL, POINT_SCHEMA

from kvserve.server.errors import APIError
from kvserve.server.protocol import ChatCompletionRequest
from kvserve.server.tools import (
    ToolCallStream,
    ToolPlan,
    parse_hermes,
    parse_llama3_json,
    plan_tools,
    template_messages,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_hermes_parser():
    assert parse_hermes("No tools needed.") == ("No tools needed.", [])
    content, calls = parse_hermes('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    two = (
        'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    content, calls = parse_hermes(two)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    content, calls = parse_hermes('<tool_call>{"name": "get_time", "arguments": {}}')  # unclosed: ended there
    assert [c.name for c in calls] == ["get_time"]
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_hermes(broken) == (broken, [])  # not a call after all: all of it is content


def test_llama3_json_parser():
    assert parse_llama3_json("Hello there") == ("Hello there", [])
    content, calls = parse_llama3_json('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert content is None and json.loads(calls[0].arguments) == {"city": "Rome"}
    content, calls = parse_llama3_json('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    assert [c.name for c in calls] == ["a", "b"]
    assert parse_llama3_json('{"city": "Rome"}') == ('{"city": "Rome"}', [])  # JSON, but not a call


def test_enforced_forms_constrain_and_read_back():
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required"), parser=None)
    schema = plan.constraint["json"]
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    content, calls = plan.calls('[{"name": "get_time", "parameters": {}}]')
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_time", "{}")]
    assert plan.calls('[{"name": "get_ti') == ('[{"name": "get_ti', [])  # cut short: content
    single = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False), None)
    assert single.constraint["json"]["maxItems"] == 1
    named = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice=named), parser=None)
    assert plan.constraint == {"json": WEATHER["function"]["parameters"]}
    assert [(c.name, c.arguments) for c in plan.calls('{"city": "Oslo"}')[1]] == [("get_weather", '{"city": "Oslo"}')]
    assert plan_tools(request(tools=[WEATHER], tool_choice="none"), None).constraint is None
    assert isinstance(plan_tools(request(tools=[WEATHER]), "hermes"), ToolPlan)  # auto, with a parser


@pytest.mark.parametrize(
    "fields, parser, message",
    [
        ({"tool_choice": "required"}, None, "needs tools"),
        ({"tools": [WEATHER]}, None, "--tool-call-parser"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "not among"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, None, "unique"),
    ],
)
def test_plan_refusals(fields, parser, message):
    """(An enforced call beside another constraint is refused in chat.py: test_server's tool 400s.)"""
    with pytest.raises(APIError, match=message) as info:
        plan_tools(request(**fields), parser)
    assert info.value.status == 400


def test_required_calls_keep_schema_references_resolvable():
    """pydantic-style tool schemas use "#/$defs/...": under the array they must still resolve, and
    xgrammar compiles the result."""
    from kvserve.sampling_params import StructuredOutputsParams

    schema = plan_tools(request(tools=[PLOT_TOOL, TIME], tool_choice="required"), None).constraint["json"]
    assert schema["$defs"] == {"Point": POINT_SCHEMA}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    StructuredOutputsParams(json=schema)  # well-formed; the server test compiles required calls with xgrammar
    other = {
        "type": "function",
        "function": {"name": "g", "parameters": {**PLOT_PARAMETERS, "$defs": {"Point": {"type": "string"}}}},
    }
    with pytest.raises(APIError, match="differently"):
        plan_tools(request(tools=[PLOT_TOOL, other], tool_choice="required"), None)


def test_named_call_cut_short_is_content():
    named = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_tools(request(tools=[WEATHER], tool_choice=named), None)
    assert plan.calls('{"city": "Os') == ('{"city": "Os', [])


def test_template_messages_turn_argument_text_into_objects():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "content": "2"}]
    out = template_messages(messages)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the request is not changed
    assert out[1] == messages[1]


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
STREAMED_TEXTS = {
    "hermes": [
        "No tools needed, the sky is blue.",
        CALL,
        "Let me check the weather.\n\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"),
        "  \n" + CALL,
        "I will write <tool_ca but no call. <tool_call>{not json}</tool_call> trailing  ",
        "Ends with spaces and half a tag   <tool_",
    ],
    "llama3_json": [
        "Hello there, no call.",
        '  <|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}',
        '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}',
        '{"city": "Rome"}',
        "<|python",
    ],
}


@pytest.mark.parametrize("parser", sorted(STREAMED_TEXTS))
@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_auto_stream_sends_content_early_and_equals_the_parse(parser, piece):
    """Whatever the deltas, the streamed content plus finish()'s remainder is the content the parser finds
    in the whole text, the calls are its calls, and nothing from a call's tag on is sent early."""
    plan = ToolPlan("auto", [WEATHER], parser=parser)
    for text in STREAMED_TEXTS[parser]:
        stream = ToolCallStream(parser)
        sent = "".join(stream.add(text[i : i + piece]) for i in range(0, len(text), piece))
        rest, calls = stream.finish(plan)
        content, expected_calls = plan.calls(text)
        assert sent + rest == (content or ""), text
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected_calls]
        assert "<tool_call>" not in sent and "<|python_tag|>" not in sent
        if calls and content:  # the text before a call went out before the answer ended
            assert sent == content


def test_auto_stream_holds_only_what_may_become_a_call():
    stream = ToolCallStream("hermes")
    assert stream.add("  ") == ""  # blank so far: a call may follow, leaving no content
    assert stream.add("Let me") == "  Let me"
    assert stream.add(" check. <tool") == " check."  # the space and the half tag wait
    assert stream.add("_call>{") == ""
    json_stream = ToolCallStream("llama3_json")
    assert json_stream.add(" {") == "" and ToolCallStream("llama3_json").add(" Sure") == " Sure"
