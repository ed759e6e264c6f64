"""POST /tokenize and /detokenize, in vLLM's shapes: what the engine would see for a prompt or a chat,
without running it (token budgets, prompt caching keys, debugging a chat template); and GET
/tokenizer_info, the tokenizer's configuration as tokenizer_config.json would hold it (vLLM's endpoint,
which lm-eval's remote tokenizer reads).

Tokenizing a chat renders the same template with the same arguments as /v1/chat/completions, so
`count` is that request's `usage.prompt_tokens`. Detokenizing keeps special tokens, so
detokenize(tokenize(text)) gives the text back.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from kvserve.server.errors import APIError
from kvserve.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from kvserve.server.serving import ServerState, chat_prompt_ids, parse_body


async def tokenize(state: ServerState, request: Request) -> JSONResponse:
    req = await parse_body(request, TokenizeRequest)
    state.check_model(req.model)
    tokenizer = state.need_tokenizer("/tokenize")
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if req.prompt is not None:
        tokens = tokenizer.encode(req.prompt, True if req.add_special_tokens is None else req.add_special_tokens)
    else:
        tokens = chat_prompt_ids(tokenizer, req, bool(req.add_special_tokens))
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


async def tokenizer_info(state: ServerState) -> JSONResponse:
    """tokenizer_class, the special tokens, the chat template, model_max_length (the server's
    max_model_len), added_tokens_decoder, and the tokenizer's other JSON-able init settings."""
    spec = state.need_tokenizer("/tokenizer_info").spec
    info: dict[str, Any] = dict(spec.init_kwargs)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        info[name] = spec.special_tokens.get(name)
    info |= {
        "added_tokens_decoder": spec.added_tokens,
        "tokenizer_class": spec.tokenizer_class,
        "chat_template": spec.chat_template,
        "model_max_length": state.max_model_len,
    }
    return JSONResponse(info)
