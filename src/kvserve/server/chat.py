"""POST /v1/chat/completions: messages through the model's chat template -> assistant replies.

The template is rendered and tokenized here, on the asyncio thread, so a malformed conversation is a
400 before anything reaches the engine, and the engine thread only sees token ids. Streaming sends,
per choice, a first chunk with the role, then content deltas, then the finish reason; with
`stream_options.include_usage` a last chunk with no choices carries the usage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvserve.async_engine import RequestChannel, Submission
from kvserve.sampling_params import SamplingParams, StructuredOutputsParams
from kvserve.server.errors import APIError, param_renamed
from kvserve.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from kvserve.server.serving import (
    SSE_DONE,
    ClientGone,
    ServerState,
    SSEResponse,
    chat_prompt_ids,
    collect,
    new_id,
    parse_body,
    sampling_params,
    sorted_top,
    sse,
    sse_error,
    submit,
    usage,
)
from kvserve.server.tools import ToolCallText, ToolPlan, plan_tools, template_messages, tool_call_stream


def _chat_logprobs(
    state: ServerState, token_ids: list[int], entries: list[dict[int, float]] | None, top_n: int
) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries or []):
        piece = state.piece(token_id)
        top = [
            TopLogprob(token=state.piece(t), logprob=lp, bytes=list(state.piece(t).encode()))
            for t, lp in sorted_top(entry, top_n)
        ]
        content.append(TokenLogprob(token=piece, logprob=entry[token_id], bytes=list(piece.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


@dataclass
class PreparedChat:
    """A chat request turned into what the engine takes: the rendered prompt's ids, the sampling params
    (with a tool constraint, if any), how tool calls are found (`plan`), and top logprobs (None: off)."""

    prompt_ids: list[int]
    params: SamplingParams
    plan: ToolPlan | None
    top_n: int | None


def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> PreparedChat:
    """Checks and renders a chat request (also /v1/responses', translated into one); APIError on bad input."""
    state.check_model(req.model)
    tokenizer = state.need_tokenizer("chat")
    if not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    plan = plan_tools(req, state.tool_call_parser)
    req.messages = template_messages(req.messages)  # earlier turns' tool calls, with or without tools now
    prompt_ids = chat_prompt_ids(tokenizer, req, tools=plan.tools) if plan else chat_prompt_ids(tokenizer, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req.sampling_params, max_tokens, top_n)
    if plan is not None and plan.constraint is not None:
        if params.structured_outputs is not None:
            message = "tool_choice required or a named function cannot be combined with another output constraint"
            raise APIError(400, message, param="tool_choice", code="invalid_value")
        params.structured_outputs = StructuredOutputsParams(**plan.constraint)
    return PreparedChat(prompt_ids, params, plan, top_n)


async def submit_chat(state: ServerState, chat: PreparedChat, request_id: str) -> RequestChannel:
    with param_renamed("prompt", "messages"):  # the prompt is the rendered conversation
        return await submit(state, [Submission(request_id, chat.prompt_ids, chat.params)])


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = await parse_body(request, ChatCompletionRequest)
    chat = prepare_chat(state, req)
    prompt_ids, plan, top_n = chat.prompt_ids, chat.plan, chat.top_n
    request_id = new_id("chatcmpl")
    channel = await submit_chat(state, chat, request_id)
    if req.stream:
        return SSEResponse(_stream(state, req, request_id, channel, len(prompt_ids), top_n, plan))
    try:
        outputs = await collect(state, channel, request)
    except ClientGone:
        return Response(status_code=499)
    out = outputs[request_id]
    choices = []
    for seq in out.outputs:
        message, finish_reason = assistant_message(plan, seq.text, seq.finish_reason)
        choices.append(
            ChatChoice(
                index=seq.index,
                message=message,
                logprobs=None if top_n is None else _chat_logprobs(state, seq.token_ids, seq.logprobs, top_n),
                finish_reason=finish_reason,
                stop_reason=seq.stop_reason,
            )
        )
    num_completion = sum(len(seq.token_ids) for seq in out.outputs)
    body = ChatCompletionResponse(
        id=request_id,
        model=state.model_name,
        choices=choices,
        usage=usage(len(prompt_ids), num_completion, out.num_cached_tokens),
    )
    return JSONResponse(body.model_dump())


def assistant_message(plan: ToolPlan | None, text: str, finish_reason: str | None) -> tuple[ChatMessage, str | None]:
    """The assistant message of a finished choice: its tool calls found or enforced, if any."""
    if plan is None or plan.mode == "none":
        return ChatMessage(content=text), finish_reason
    content, calls = plan.calls(text)
    if not calls:
        return ChatMessage(content=content), finish_reason
    return ChatMessage(content=content, tool_calls=_tool_calls(calls)), _calls_finish(finish_reason)


def _tool_calls(calls: list[ToolCallText]) -> list[ToolCall]:
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def _calls_finish(finish_reason: str | None) -> str | None:
    """A choice that ended on its own after calling tools finishes with "tool_calls" (OpenAI's)."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


async def _stream(
    state: ServerState,
    req: ChatCompletionRequest,
    request_id: str,
    channel: RequestChannel,
    num_prompt_tokens: int,
    top_n: int | None,
    plan: ToolPlan | None,
) -> AsyncIterator[str]:
    created = int(time.time())
    num_completion = 0
    # a choice that may call tools: "auto" content streams while it cannot be a call; required and named
    # calls (JSON to the end) are held whole; the calls come in the choice's last delta
    streams = [tool_call_stream(plan) for _ in range(req.n)] if plan is not None and plan.mode != "none" else None

    def chunk(choices: list[ChatStreamChoice], **extra) -> str:
        return sse(
            ChatCompletionChunk(id=request_id, created=created, model=state.model_name, choices=choices, **extra)
        )

    try:
        # the role first, for every choice (clients build the message from it)
        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(req.n)])
        async for _, deltas in channel:
            choices = []
            for delta in deltas:
                num_completion += len(delta.token_ids)
                logprobs = None
                if top_n is not None and delta.token_ids:
                    logprobs = _chat_logprobs(state, delta.token_ids, delta.logprobs, top_n)
                finish_reason = delta.finish_reason
                message = DeltaMessage(content=delta.text) if delta.text else DeltaMessage()
                if streams is not None:
                    stream = streams[delta.index]
                    content = stream.add(delta.text)
                    message = DeltaMessage(content=content or None)
                    if finish_reason is not None:
                        rest, calls = stream.finish(plan)
                        deltas_calls = [
                            DeltaToolCall(index=i, **c.model_dump()) for i, c in enumerate(_tool_calls(calls))
                        ]
                        message = DeltaMessage(content=(content + rest) or None, tool_calls=deltas_calls or None)
                        finish_reason = _calls_finish(finish_reason) if calls else finish_reason
                if message.content or message.tool_calls or logprobs is not None or finish_reason is not None:
                    choices.append(
                        ChatStreamChoice(
                            index=delta.index,
                            delta=message,
                            logprobs=logprobs,
                            finish_reason=finish_reason,
                            stop_reason=delta.stop_reason,
                        )
                    )
            if choices:
                yield chunk(choices)
        if req.include_usage:
            num_cached = sum(o.num_cached_tokens for o in channel.outputs.values())
            yield chunk([], usage=usage(num_prompt_tokens, num_completion, num_cached))
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, then end the stream
        yield sse_error(exc)
    finally:
        if not channel.finished:
            state.engine.abort(channel)
    yield SSE_DONE
