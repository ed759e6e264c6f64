"""POST /v1/responses, stateless: OpenAI's Responses API over the chat path.

A request is translated into a chat completion request (`instructions` as the system message, `input`
items as messages: `message` with text content, `function_call` as an assistant turn's tool call,
`function_call_output` as a `tool` message; flat function tools and `text.format` as the chat API's
nested ones) and runs exactly as /v1/chat/completions would, chat template, tool parser and structured
outputs included. Its answer comes back as output items: a `message` with one `output_text` part,
then one `function_call` item per call. Nothing is stored: a client sends the whole conversation each
time (with earlier output items passed back as input), `store: true` and `previous_response_id` are
refused by name.

Streaming sends the API's typed events (`event:` + `data:`, numbered by `sequence_number`, no
`[DONE]`): response.created, response.in_progress, then per output item output_item.added,
content_part.added, output_text.delta..., output_text.done, content_part.done, output_item.done (a
function call: function_call_arguments.delta / .done), and response.completed, or response.incomplete
when max_output_tokens cut the answer. As on the chat endpoint, text that may still become a tool call
is held back (tools.ToolCallStream) and the calls come whole when the answer ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from kvserve.async_engine import RequestChannel
from kvserve.server.chat import PreparedChat, assistant_message, prepare_chat, submit_chat
from kvserve.server.errors import APIError, from_validation_error, param_renamed
from kvserve.server.protocol import ChatCompletionRequest, ChatMessage, ResponsesRequest
from kvserve.server.serving import ClientGone, ServerState, SSEResponse, channel_error, collect, new_id, parse_body
from kvserve.server.tools import tool_call_stream

_REFUSED = "unsupported_parameter"  # the code of a field refused by name, as for undeclared fields
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
# The keys an input item of each type may carry: what this API's own output items hold, so earlier
# answers can be passed back as they came.
_ITEM_KEYS = {
    "message": {"type", "role", "content", "id", "status"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
}


def _bad_input(index: int, message: str) -> APIError:
    return APIError(400, f"input[{index}]: {message}", param="input", code="invalid_value")


def _text(content: Any, index: int) -> str:
    """A message's content: a string, or input_text / output_text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad_input(index, "content must be a string or a list of input_text parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise _bad_input(index, f"only text content parts work (input_text, output_text), not {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """instructions + input as chat messages; consecutive function_call items make one assistant turn."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind not in _ITEM_KEYS:
            raise _bad_input(
                i, f"items of type {kind!r} are not supported (message, function_call, function_call_output)"
            )
        unknown = sorted(set(item) - _ITEM_KEYS[kind])
        if unknown:
            raise _bad_input(i, f"unsupported field {unknown[0]!r} in a {kind} item")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise _bad_input(i, f"role must be one of {sorted(_ROLES)}, not {role!r}")
            messages.append({"role": _ROLES[role], "content": _text(item.get("content"), i)})
        elif kind == "function_call":
            fields = [item.get(k) for k in ("call_id", "name", "arguments")]
            if not all(isinstance(f, str) for f in fields):
                raise _bad_input(i, "a function_call needs call_id, name and arguments strings")
            call = {"id": fields[0], "type": "function", "function": {"name": fields[1], "arguments": fields[2]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise _bad_input(i, "a function_call_output needs call_id and output strings")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    if not messages:
        raise APIError(400, "input is empty", param="input", code="invalid_value")
    return messages


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request this one means; APIError (naming this API's fields) when it cannot."""
    if req.store:
        raise APIError(400, "store: this server keeps no responses; send store: false", param="store", code=_REFUSED)
    if req.previous_response_id is not None:
        message = "previous_response_id: this server keeps no responses; send the whole conversation as input"
        raise APIError(400, message, param="previous_response_id", code=_REFUSED)
    if req.include:
        raise APIError(
            400, f"include: nothing extra can be included ({req.include[0]!r})", param="include", code=_REFUSED
        )
    body: dict[str, Any] = {
        "model": req.model,
        "messages": chat_messages(req),
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "user": req.user,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in req.tools
        ]
    if isinstance(req.tool_choice, str):
        body["tool_choice"] = req.tool_choice
    elif req.tool_choice is not None:
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or not fmt.name:
            raise APIError(400, "text.format json_schema needs a name and a schema", param="text.format")
        schema = {"name": fmt.name, "schema": fmt.json_schema, "description": fmt.description, "strict": fmt.strict}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc, ChatCompletionRequest) from None


class _Response:
    """Builds the response object and its output items for one request."""

    def __init__(self, state: ServerState, req: ResponsesRequest, num_input_tokens: int) -> None:
        self.state, self.req = state, req
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.num_input_tokens = num_input_tokens
        self.message_id = new_id("msg")

    def items(self, message: ChatMessage, status: str) -> list[dict[str, Any]]:
        """A message item with the text (when there is text, or nothing else), then one per tool call."""
        items = []
        calls = message.tool_calls or []
        if message.content or not calls:
            items.append(self.message_item(message.content or "", status))
        for call in calls:
            items.append(
                {
                    "type": "function_call",
                    "id": new_id("fc"),
                    "call_id": call.id,
                    "name": call.function.name,
                    "arguments": call.function.arguments,
                    "status": "completed",
                }
            )
        return items

    def message_item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [self.text_part(text)]
        return {"type": "message", "id": self.message_id, "role": "assistant", "status": status, "content": content}

    @staticmethod
    def text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def body(
        self,
        status: str,
        output: list[dict[str, Any]],
        num_output_tokens: int | None = None,
        num_cached_tokens: int = 0,
    ) -> dict[str, Any]:
        """The response object; usage once the answer is complete (num_output_tokens given)."""
        req = self.req
        tool_choice = (
            req.tool_choice.model_dump()
            if req.tool_choice is not None and not isinstance(req.tool_choice, str)
            else req.tool_choice
        )
        text_format = (
            req.text.format.model_dump(by_alias=True, exclude_none=True)
            if req.text and req.text.format
            else {"type": "text"}
        )
        usage = None
        if num_output_tokens is not None:
            usage = {
                "input_tokens": self.num_input_tokens,
                # cached_tokens: prefix-cache hits; cache writes are not billed here
                "input_tokens_details": {"cached_tokens": num_cached_tokens, "cache_write_tokens": 0},
                "output_tokens": num_output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.num_input_tokens + num_output_tokens,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.state.model_name,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": None,
            "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": text_format},
            "tool_choice": tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": "disabled",
            "usage": usage,
            "metadata": req.metadata or {},
            "user": req.user,
        }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


async def create_response(state: ServerState, request: Request) -> Response:
    req = await parse_body(request, ResponsesRequest)
    with param_renamed("messages", "input"):  # the chat's messages are this request's input
        chat = prepare_chat(state, chat_request(req))
        response = _Response(state, req, len(chat.prompt_ids))
        channel = await submit_chat(state, chat, response.id)
    if req.stream:
        return SSEResponse(_stream(state, chat, response, channel))
    try:
        outputs = await collect(state, channel, request)
    except ClientGone:
        return Response(status_code=499)
    output = outputs[response.id]
    (seq,) = output.outputs
    message, finish_reason = assistant_message(chat.plan, seq.text, seq.finish_reason)
    status = _status(finish_reason)
    items = response.items(message, status)
    return JSONResponse(response.body(status, items, len(seq.token_ids), output.num_cached_tokens))


async def _stream(
    state: ServerState, chat: PreparedChat, response: _Response, channel: RequestChannel
) -> AsyncIterator[str]:
    number = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal number
        payload = {"type": kind, "sequence_number": number, **fields}
        number += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    # The message is output item 0 (items() puts it first); it opens with the first text sent.
    at = {"item_id": response.message_id, "output_index": 0, "content_index": 0}

    def open_message() -> list[str]:
        return [
            event("response.output_item.added", output_index=0, item=response.message_item(None, "in_progress")),
            event("response.content_part.added", **at, part=response.text_part("")),
        ]

    plan = chat.plan
    # An answer that may call tools streams what cannot be a call (tools.ToolCallStream); without tools
    # the text is the content.
    stream = tool_call_stream(plan) if plan is not None and plan.mode != "none" else None
    text, sent, finish_reason, num_output, opened = "", "", None, 0, False
    try:
        yield event("response.created", response=response.body("in_progress", []))
        yield event("response.in_progress", response=response.body("in_progress", []))
        async for _, deltas in channel:
            for delta in deltas:
                num_output += len(delta.token_ids)
                finish_reason = delta.finish_reason or finish_reason
                text += delta.text
                piece = stream.add(delta.text) if stream is not None else delta.text
                if piece:
                    if not opened:
                        for line in open_message():
                            yield line
                        opened = True
                    sent += piece
                    yield event("response.output_text.delta", **at, delta=piece, logprobs=[])
        message, finish_reason = assistant_message(plan, text, finish_reason)
        status = _status(finish_reason)
        items = response.items(message, status)
        for index, item in enumerate(items):
            if item["type"] == "message":
                whole = item["content"][0]["text"]
                if not opened:
                    for line in open_message():
                        yield line
                if len(whole) > len(sent):  # what was held back (sent is a prefix of the content)
                    yield event("response.output_text.delta", **at, delta=whole[len(sent) :], logprobs=[])
                yield event("response.output_text.done", **at, text=whole, logprobs=[])
                yield event("response.content_part.done", **at, part=response.text_part(whole))
            else:
                added = {**item, "arguments": "", "status": "in_progress"}
                yield event("response.output_item.added", output_index=index, item=added)
                call_at = {"item_id": item["id"], "output_index": index}
                yield event("response.function_call_arguments.delta", **call_at, delta=item["arguments"])
                yield event(
                    "response.function_call_arguments.done", **call_at, name=item["name"], arguments=item["arguments"]
                )
            yield event("response.output_item.done", output_index=index, item=item)
        final = response.body(status, items, num_output, channel.outputs[response.id].num_cached_tokens)
        yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, then end the stream
        error = channel_error(exc)
        yield event("error", code=error.code, message=error.message, param=None)
    finally:
        if not channel.finished:
            state.engine.abort(channel)
