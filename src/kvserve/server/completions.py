"""POST /v1/completions: prompts (text, token ids, or lists of either) -> choices, streamed or not.

Choice index = prompt index * n + sample index, as OpenAI and vLLM number them. With `echo`, each
choice's text starts with its prompt, and with `echo` + `logprobs` its logprobs start with the
prompt's (the first prompt token has none: `null`), which is how lm-eval scores prompts
(`max_tokens` 0 asks for nothing else).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvserve.async_engine import RequestChannel, Submission
from kvserve.server.errors import APIError
from kvserve.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from kvserve.server.serving import (
    SSE_DONE,
    ClientGone,
    ServerState,
    SSEResponse,
    collect,
    new_id,
    parse_body,
    sampling_params,
    sse,
    sse_error,
    submit,
    usage,
)


class _LogprobsBuilder:
    """Appends tokens to one choice's CompletionLogprobs, keeping text_offset (characters into the choice's
    text, counted over the token strings)."""

    def __init__(self, state: ServerState, offset: int = 0) -> None:
        self.state = state
        self.offset = offset

    def add(self, out: CompletionLogprobs, token_ids: list[int], entries: list[dict[int, float] | None]) -> None:
        for token_id, entry in zip(token_ids, entries):
            piece = self.state.piece(token_id)
            out.tokens.append(piece)
            out.token_logprobs.append(None if entry is None else entry.get(token_id))
            if entry is None:
                out.top_logprobs.append(None)
            else:
                # the sampled token is included even outside the top N (as vLLM does), so a client can
                # always tell whether it was the most likely one (lm-eval's is_greedy)
                top: dict[str, float] = {}
                for t, lp in sorted(entry.items(), key=lambda kv: -kv[1]):
                    top.setdefault(self.state.piece(t), lp)
                out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(piece)


async def create_completion(state: ServerState, request: Request) -> Response:
    req = await parse_body(request, CompletionRequest)
    state.check_model(req.model)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    encoded: list[tuple[list[int], str | None]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            encoded.append((state.need_tokenizer("a text prompt").encode(prompt), prompt))
        else:
            encoded.append((list(prompt), None))
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    base = new_id("cmpl")
    submissions = [
        Submission(
            f"{base}-{i}",
            ids,
            sampling_params(req.sampling_params, req.max_tokens, req.logprobs, prompt_logprobs),
            prompt_text=text,
        )
        for i, (ids, text) in enumerate(encoded)
    ]
    echoes = [text if text is not None else _decode(state, ids) for ids, text in encoded] if req.echo else None
    channel = await submit(state, submissions)
    if req.stream:
        return SSEResponse(_stream(state, req, base, channel, encoded, echoes))
    try:
        outputs = await collect(state, channel, request)
    except ClientGone:
        return Response(status_code=499)
    choices = []
    num_completion = num_cached = 0
    for p, sub in enumerate(submissions):
        out = outputs[sub.request_id]
        num_cached += out.num_cached_tokens
        for seq in out.outputs:
            text = seq.text
            logprobs = None
            if req.logprobs is not None:
                logprobs = CompletionLogprobs()
                builder = _LogprobsBuilder(state)
                if req.echo:
                    builder.add(
                        logprobs, out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                    )
                builder.add(logprobs, seq.token_ids, seq.logprobs or [])
            if echoes is not None:
                text = echoes[p] + text
            num_completion += len(seq.token_ids)
            choices.append(
                CompletionChoice(
                    index=p * req.n + seq.index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
    num_prompt = sum(len(ids) for ids, _ in encoded)
    body = CompletionResponse(
        id=base, model=state.model_name, choices=choices, usage=usage(num_prompt, num_completion, num_cached)
    )
    return JSONResponse(body.model_dump())


def _decode(state: ServerState, ids: list[int]) -> str:
    return state.tokenizer.decode(ids, skip_special_tokens=False) if state.tokenizer is not None else ""


async def _stream(
    state: ServerState,
    req: CompletionRequest,
    base: str,
    channel: RequestChannel,
    encoded: list[tuple[list[int], str | None]],
    echoes: list[str] | None,
) -> AsyncIterator[str]:
    created = int(time.time())
    prompt_index = {sub_id: p for p, sub_id in enumerate(channel.request_ids)}
    builders: dict[int, _LogprobsBuilder] = {}
    echoed: set[int] = set()
    num_completion = 0

    def chunk(index: int, text: str, logprobs=None, finish=None, stop_reason=None) -> str:
        choice = CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason
        )
        return sse(CompletionResponse(id=base, created=created, model=state.model_name, choices=[choice]))

    try:
        async for request_id, deltas in channel:
            p = prompt_index[request_id]
            for delta in deltas:
                index = p * req.n + delta.index
                text, logprobs = delta.text, None
                builder = builders.setdefault(index, _LogprobsBuilder(state))
                if req.logprobs is not None:
                    logprobs = CompletionLogprobs()
                if echoes is not None and index not in echoed:
                    echoed.add(index)
                    text = echoes[p] + text
                    if logprobs is not None:
                        ids = encoded[p][0]
                        builder.add(logprobs, ids, channel.prompt_logprobs.get(request_id) or [None] * len(ids))
                if logprobs is not None:
                    builder.add(logprobs, delta.token_ids, delta.logprobs or [])
                num_completion += len(delta.token_ids)
                if text or logprobs is not None or delta.finish_reason is not None:
                    yield chunk(index, text, logprobs, delta.finish_reason, delta.stop_reason)
        if req.include_usage:
            num_prompt = sum(len(ids) for ids, _ in encoded)
            num_cached = sum(o.num_cached_tokens for o in channel.outputs.values())
            final = CompletionResponse(
                id=base,
                created=created,
                model=state.model_name,
                choices=[],
                usage=usage(num_prompt, num_completion, num_cached),
            )
            yield sse(final)
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, then end the stream
        yield sse_error(exc)
    finally:
        if not channel.finished:
            state.engine.abort(channel)
    yield SSE_DONE
