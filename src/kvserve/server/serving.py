"""What the completions and chat handlers share: server state, request parsing, submission, waiting
for a whole result while watching for the client leaving, server-sent events, usage, logprob pieces.

Abort invariant: an HTTP request whose client goes away aborts its engine requests at once:
non-streaming requests race the result against the ASGI `http.disconnect` message; streaming
responses are cancelled by Starlette when the client disconnects, and the stream's `finally`
aborts. Either way the engine frees the blocks on its next turn (within one step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kvserve.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    QueueTimeoutError,
    RequestChannel,
    Submission,
)
from kvserve.engine import StepFailed
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.errors import APIError, from_validation_error, from_value_error
from kvserve.server.protocol import PromptTokensDetails, Usage
from kvserve.tokenizer import Tokenizer, chat_template_kwargs

logger = logging.getLogger("kvserve.server")

# Request fields a SamplingParams / engine ValueError may name (its message starts with the field).
KNOWN_PARAMS = {f.name for f in dataclasses.fields(SamplingParams)} | {"prompt", "messages", "response_format"}

M = TypeVar("M", bound=BaseModel)


@dataclasses.dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Tokenizer | None
    model_name: str
    model_aliases: set[str]  # other names a request may use for the one model (its path, --model)
    max_model_len: int
    tool_call_parser: str | None = None  # --tool-call-parser: how "auto" tool choice finds calls in text
    hidden_size: int | None = None  # the model's: the length of an embedding
    vocab_size: int = 0  # the model's: token ids are below it

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name and name not in self.model_aliases:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise APIError(400, f"this model has no tokenizer: {what} needs one (send token ids)", code="no_tokenizer")
        return self.tokenizer

    def piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_piece(token_id) if self.tokenizer is not None else f"token_id:{token_id}"


async def parse_body(request: Request, model: type[M]) -> M:
    try:
        body = await request.body()
    except ClientDisconnect:  # gone mid-upload: nobody to answer, nothing to log as a server error
        message = "the client closed the connection before sending its whole request"
        raise APIError(499, message, code="client_closed") from None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"invalid JSON body: {exc}", code="invalid_json") from None
    except RecursionError:  # thousands of nested arrays: Python's parser gives up before the body limit
        raise APIError(400, "invalid JSON body: nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, model) from None


def chat_prompt_ids(tokenizer: Tokenizer, req, add_special_tokens: bool = False, **template: Any) -> list[int]:
    """req.messages through the chat template with req's template fields (add_generation_prompt,
    continue_final_message, chat_template_kwargs), as token ids: the one rendering /v1/chat/completions
    and /tokenize share, so /tokenize counts what the chat would see. `template`: more template arguments
    (the chat's tools). Bad input is a 400 naming the field."""
    try:
        kwargs = chat_template_kwargs(req.chat_template_kwargs)
    except ValueError as exc:
        raise APIError(400, str(exc), param="chat_template_kwargs", code="invalid_value") from None
    try:
        text = tokenizer.render_chat(
            req.messages, req.add_generation_prompt, req.continue_final_message, **kwargs, **template
        )
        return tokenizer.encode(text, add_special_tokens)
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), param="messages", code="invalid_value") from None


def sampling_params(build, *args) -> SamplingParams:
    try:
        return build(*args)
    except ValueError as exc:
        raise from_value_error(exc, KNOWN_PARAMS) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def submit(state: ServerState, submissions: list[Submission]) -> RequestChannel:
    try:
        for spec in {
            s.params.structured_outputs.key(): s.params.structured_outputs
            for s in submissions
            if s.params.structured_outputs is not None
        }.values():
            await state.engine.compile_grammar(spec)  # off the engine thread: a bad spec is a 400 here
        return await state.engine.submit(submissions)
    except QueueFullError as exc:
        raise APIError(503, str(exc), code="queue_full") from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_unavailable") from None
    except (ValueError, TypeError) as exc:
        raise from_value_error(ValueError(str(exc)), KNOWN_PARAMS) from None


class ClientGone(Exception):
    """The client disconnected before its non-streaming result was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(state: ServerState, channel: RequestChannel, request: Request) -> dict[str, RequestOutput]:
    """Waits for every request of the channel; aborts them and raises ClientGone if the client leaves."""

    async def drain() -> None:
        async for _ in channel:
            pass

    work = asyncio.ensure_future(drain())
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            state.engine.abort(channel)
    if not work.done() or work.cancelled():
        raise ClientGone()
    try:
        work.result()
    except (EngineDeadError, StepFailed, QueueTimeoutError) as exc:
        state.engine.abort(channel)  # the channel's other prompts: their answer cannot be whole any more
        raise channel_error(exc) from None
    return channel.outputs


def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens),
    )


# Characters JSON leaves raw inside strings but that line readers built on str.splitlines split lines at
# (httpx's aiter_lines among them: the soak met a generated one that cut an event in two). Escaped, every
# event stays one line for every client; they can only occur inside JSON strings, where the escape means
# the same character. (json.dumps escapes all non-ASCII already.)
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json().translate(_LINE_BREAKERS)}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def channel_error(exc: Exception) -> APIError:
    """What an exception out of a channel means to the client: the status of a whole answer, or the error
    a stream reports in-band once its headers are sent."""
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, QueueTimeoutError):
        return APIError(503, str(exc), code="queue_timeout")
    code = "engine_step_failed" if isinstance(exc, StepFailed) else "internal_error"
    return APIError(500, str(exc), code=code)


def sse_error(exc: Exception) -> str:
    return sse(channel_error(exc).body())


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator, so the generator's `finally`
    (which aborts unfinished engine requests) runs however the response ends, whatever the ASGI server."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sorted_top(entry: dict[int, float], limit: int | None = None) -> list[tuple[int, float]]:
    """A logprob dict's entries, most likely first, cut to `limit`."""
    items = sorted(entry.items(), key=lambda kv: -kv[1])
    return items if limit is None else items[:limit]
