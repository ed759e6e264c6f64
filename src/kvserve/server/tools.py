"""Tool calling for /v1/chat/completions: `tools` and `tool_choice` (OpenAI's), as vLLM does them.

- The tools go to the chat template (transformers' apply_chat_template(tools=...)), which tells the
  model about them in its own format; assistant turns that called tools and `role: "tool"` replies
  go back through the template too (their JSON-string arguments as objects, which templates expect).
- `tool_choice: "required"` and a named function are enforced with structured outputs: the answer is
  a JSON array of {"name", "parameters"} calls (one schema per tool, anyOf), or the named function's
  parameters object. `"auto"` (the default when tools are given) lets the model write freely and a
  parser chosen with `--tool-call-parser` finds the calls in its text: `hermes` (`<tool_call>{...}
  </tool_call>`, Qwen2.5/3 and SmolLM-style templates) or `llama3_json` (a JSON object, or several
  separated by `;`, optionally after `<|python_tag|>`). `"none"`: plain text.
- A reply with calls has `message.tool_calls` (ids, JSON-string arguments) and `finish_reason:
  "tool_calls"`. Streamed, "auto" sends the content as it is generated and holds back only what may
  still become a call (ToolCallStream); the calls come in the choice's last delta, whole, so the
  streamed content and arguments are the non-streamed ones. Required and named calls (all JSON) come
  in the last delta too.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvserve.server.errors import APIError


@dataclass
class ToolCallText:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    tools: list[dict[str, Any]]  # as the chat template takes them
    named: str | None = None
    parser: str | None = None
    # structured_outputs fields that enforce the call (required and named calls), else None
    constraint: dict[str, Any] | None = None

    def calls(self, text: str) -> tuple[str | None, list[ToolCallText]]:
        """(content, calls) of a finished answer; an answer that does not parse is content, no calls."""
        if self.mode == "named":
            try:
                json.loads(text)
            except ValueError:  # cut short by max_tokens or a stop string: content, no call
                return text, []
            return None, [ToolCallText(self.named, text)]
        if self.mode == "required":
            try:
                return None, [ToolCallText(c["name"], json.dumps(c["parameters"])) for c in json.loads(text)]
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens or a stop string
                return text, []
        if self.mode == "auto":
            return PARSERS[self.parser](text)
        return text, []


EMPTY_OBJECT = {"type": "object", "properties": {}}


def _enforced_constraint(tools: list[dict[str, Any]], named: str | None, parallel: bool) -> dict[str, Any]:
    """The named function's parameters schema, or (named None: tool_choice required) an array of
    {name, parameters} calls, one schema per tool."""
    schemas = {t["function"]["name"]: t["function"].get("parameters") or EMPTY_OBJECT for t in tools}
    if named is not None:
        return {"json": schemas[named]}
    calls, defs = [], {}
    for name, schema in schemas.items():
        # The schemas move under the array: their "#/$defs/..." references must still resolve from its root
        for key in ("$defs", "definitions"):
            for def_name, definition in schema.get(key, {}).items():
                if defs.setdefault(key, {}).setdefault(def_name, definition) != definition:
                    raise APIError(400, f"tools: two tools define {key}/{def_name} differently", param="tools")
        schema = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
        properties = {"name": {"type": "string", "enum": [name]}, "parameters": schema}
        required = ["name", "parameters"]
        calls.append({"type": "object", "properties": properties, "required": required, "additionalProperties": False})
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **defs}
    if not parallel:
        array["maxItems"] = 1
    return {"json": array}


def plan_tools(req, parser: str | None) -> ToolPlan | None:
    """The request's tool plan, or None when it has no tools; 400s for what cannot be served. (An enforced
    call beside another output constraint is refused by the caller, which has the request's parameters.)"""
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools", code="invalid_value")
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    plan = ToolPlan(mode="named" if not isinstance(choice, str) else choice, tools=tools)
    if plan.mode == "named":
        plan.named = choice.function.name
        if plan.named not in names:
            message = f"tool_choice names the function {plan.named!r}, which is not among the tools"
            raise APIError(400, message, param="tool_choice", code="invalid_value")
    if plan.mode == "auto":
        if parser is None:
            message = 'tool_choice "auto" (the default with tools) needs the server started with --tool-call-parser'
            raise APIError(400, message, param="tool_choice", code="invalid_value")
        plan.parser = parser
    if plan.mode in ("required", "named"):
        plan.constraint = _enforced_constraint(tools, plan.named, req.parallel_tool_calls)
    return plan


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: an assistant turn's tool-call arguments as objects (the
    API sends them as JSON text; templates write them with tojson), and its missing content as "" (a
    template without tool support concatenates the content and would fail on null)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:  # an empty list calls nothing: the content must stand alone
            fixed = []
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        function = {**function, "arguments": json.loads(function["arguments"])}
                    except ValueError:
                        pass  # left as text: the template decides
                    call = {**call, "function": function}
                fixed.append(call)
            content = message.get("content")
            message = {**message, "tool_calls": fixed, "content": "" if content is None else content}
        out.append(message)
    return out


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[ToolCallText]]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (the last may be unclosed: the
    model ended there); the text before the first block is the content."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for body in _HERMES.findall(text[start:]):
        call = _call_object(body, "arguments")
        if call is None:
            return text, []  # not what it claimed to be: all of it is content
        calls.append(call)
    content = text[:start].rstrip()  # leading space kept: a stream has sent it before a call could show
    return (content if content.strip() else None), calls


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCallText]]:
    """Llama 3.x's JSON calls: {"name": ..., "parameters": {...}} (or "arguments"), several separated by
    ';', optionally after <|python_tag|>. Anything else is content."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    decoder = json.JSONDecoder()
    at = 0
    while at < len(body):
        try:
            value, end = decoder.raw_decode(body, at)
        except ValueError:
            return text, []
        call = _call_from(value, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        at = end
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    return None, calls


def _call_object(body: str, key: str) -> ToolCallText | None:
    try:
        return _call_from(json.loads(body), key)
    except ValueError:
        return None


def _call_from(value: Any, key: str) -> ToolCallText | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(key, value.get("arguments" if key == "parameters" else "parameters", {}))
    return ToolCallText(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json}


_HERMES_START = "<tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (a tag still arriving)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


@dataclass
class ToolCallStream:
    """Streams the content of an answer that may call tools ("auto") while it is generated, holding back
    only what may still turn out to be a call. Invariant: what was sent is a prefix of the content the
    parser finds in the whole text at the end (and nothing was sent when it finds no content), so the
    streamed deltas plus `finish`'s remainder equal the non-streamed message.

    hermes: everything before `<tool_call>` (a tag half-arrived is held), but not trailing whitespace
    (the parser drops it before a call) nor a text so far blank (a call may follow, leaving no content).
    llama3_json: a call is the whole answer, so an answer that starts (after whitespace) with `{` or
    `<|python_tag|>` is held to the end; any other is content from its first character. No parser
    (required and named calls: the answer is JSON to its end): everything is held."""

    parser: str | None
    text: str = ""
    sent: int = 0  # characters of text sent as content

    def add(self, delta: str) -> str:
        """The content that can be sent now."""
        self.text += delta
        end = self._safe_end()
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self, plan: ToolPlan) -> tuple[str, list[ToolCallText]]:
        """(the content not sent yet, the calls) once the answer is complete."""
        content, calls = plan.calls(self.text)
        return (content or "")[self.sent :], calls

    def _safe_end(self) -> int:
        text = self.text
        if self.parser is None:
            return 0
        if self.parser == "hermes":
            start = text.find(_HERMES_START)
            end = start if start >= 0 else len(text) - _partial_tag_len(text, _HERMES_START)
            head = text[:end].rstrip()
            return len(head) if head.strip() else 0
        body = text.lstrip()
        if not body or body.startswith(("{", _PYTHON_TAG)) or _PYTHON_TAG.startswith(body):
            return 0
        return len(text)


def tool_call_stream(plan: ToolPlan) -> ToolCallStream:
    """The stream of a choice that may call tools: "auto" parses as it goes, the enforced forms hold all."""
    return ToolCallStream(plan.parser if plan.mode == "auto" else None)
