"""POST /v1/embeddings: inputs (text, token ids, or lists of either) -> one vector each.

An embedding is the model's final hidden states (after its last norm) mean-pooled over the input's
tokens and L2-normalized (SamplingParams.embed). Every model the server loads serves it, next to
generation: no `--task embed` switch. Each input is one request of the engine's batch, so embeddings
share steps with running generations; an input is computed whole (prefix-cache hits would skip
positions the mean needs). `encoding_format: "base64"` (what the `openai` client asks for by default)
carries the little-endian float32 values.
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvserve.async_engine import Submission
from kvserve.sampling_params import SamplingParams
from kvserve.server.errors import APIError, param_renamed
from kvserve.server.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from kvserve.server.serving import ClientGone, ServerState, collect, new_id, parse_body, submit


async def create_embeddings(state: ServerState, request: Request) -> Response:
    req = await parse_body(request, EmbeddingRequest)
    state.check_model(req.model)
    if req.dimensions is not None and req.dimensions != state.hidden_size:
        message = f"dimensions must be this model's hidden size ({state.hidden_size}): it cannot shorten embeddings"
        raise APIError(400, message, param="dimensions", code="invalid_value")
    inputs = req.inputs()
    if not inputs:
        raise APIError(400, "input is empty", param="input")
    encoded: list[list[int]] = []
    for item in inputs:
        ids = (
            state.need_tokenizer("a text input").encode(item, req.add_special_tokens) if isinstance(item, str) else item
        )
        if not ids:
            raise APIError(400, "input contains an empty string or token list", param="input")
        encoded.append(list(ids))
    base = new_id("embd")
    params = SamplingParams(max_tokens=0, embed=True)
    submissions = [Submission(f"{base}-{i}", ids, params) for i, ids in enumerate(encoded)]
    with param_renamed("prompt", "input"):  # the engine checks each input as a prompt (length, token ids)
        channel = await submit(state, submissions)
    try:
        outputs = await collect(state, channel, request)
    except ClientGone:
        return Response(status_code=499)
    data = []
    for i, sub in enumerate(submissions):
        vector = outputs[sub.request_id].embedding
        if req.encoding_format == "base64":
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append(EmbeddingData(index=i, embedding=vector))
    num_tokens = sum(len(ids) for ids in encoded)
    body = EmbeddingResponse(
        id=base,
        model=state.model_name,
        data=data,
        usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
    )
    return JSONResponse(body.model_dump())
