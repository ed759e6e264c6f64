"""POST /tokenize and /detokenize, in vLLM's shapes: what the engine would see for a prompt or a chat,
without running it (token budgets, prompt caching keys, debugging a chat template).

Tokenizing a chat renders the same template with the same arguments as /v1/chat/completions, so
`count` is that request's `usage.prompt_tokens`. Detokenizing keeps special tokens, so
detokenize(tokenize(text)) gives the text back.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from kvserve.server.errors import APIError
from kvserve.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from kvserve.server.serving import ServerState, parse_body
from kvserve.tokenizer import chat_template_kwargs


async def tokenize(state: ServerState, request: Request) -> JSONResponse:
    req = await parse_body(request, TokenizeRequest)
    state.check_model(req.model)
    tokenizer = state.need_tokenizer("/tokenize")
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    try:
        if req.prompt is not None:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            tokens = tokenizer.encode(req.prompt, add_special)
        else:
            try:
                kwargs = chat_template_kwargs(req.chat_template_kwargs)
            except ValueError as exc:
                raise APIError(400, str(exc), param="chat_template_kwargs", code="invalid_value") from None
            text = tokenizer.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message, **kwargs)
            tokens = tokenizer.encode(text, bool(req.add_special_tokens))
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), param="messages", code="invalid_value") from None
    strs = [tokenizer.id_to_piece(t) for t in tokens] if req.return_token_strs else None
    body = TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens, token_strs=strs)
    return JSONResponse(body.model_dump())


async def detokenize(state: ServerState, request: Request) -> JSONResponse:
    req = await parse_body(request, DetokenizeRequest)
    state.check_model(req.model)
    tokenizer = state.need_tokenizer("/detokenize")
    bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"tokens must be ids in [0, {tokenizer.vocab_size}); got {bad[:3]}", param="tokens")
    return JSONResponse(DetokenizeResponse(prompt=tokenizer.decode(req.tokens, skip_special_tokens=False)).model_dump())
