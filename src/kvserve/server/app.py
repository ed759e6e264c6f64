"""The OpenAI-compatible HTTP server: FastAPI app, auth, body limit, lifecycle.

Threads: the asyncio loop (uvicorn, this module, the handlers) and the engine thread (AsyncEngine).
The engine is built before the socket is bound, so a bad model path fails at once with exit 2, and
a client that sees /health 200 can be served.

Shutdown on SIGINT/SIGTERM (drain.py): new requests get 503 while in-flight ones finish, for up to
--shutdown-timeout seconds; then the engine stops, the rest end with an error saying so, and the
process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import os
import signal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvserve.async_engine import AsyncEngine
from kvserve.config import EngineConfig
from kvserve.kv_state import MAX_CELLS, TREE_ROOTS
from kvserve.server.browser import browser_authorizer
from kvserve.server.chat import create_chat_completion
from kvserve.server.completions import create_completion
from kvserve.server.dashboard import DEFAULT_INTERVAL, MIN_INTERVAL, StateFeed, dashboard_route, kv_state_route
from kvserve.server.drain import SHUTDOWN_GRACE, Drain, DrainingServer, DrainMiddleware
from kvserve.server.embeddings import create_embeddings
from kvserve.server.errors import APIError, install_handlers
from kvserve.server.kv_info import kv_cache_blocks, kv_cache_info
from kvserve.server.metrics import ServerMetrics
from kvserve.server.openapi import ERROR_RESPONSES, GENERATION_RESPONSES, build_openapi, json_body
from kvserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    ResponsesRequest,
    TokenizeRequest,
)
from kvserve.server.responses import create_response
from kvserve.server.serving import ServerState
from kvserve.server.tokenize import detokenize, tokenize, tokenizer_info

logger = logging.getLogger("kvserve.server")

DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds in-flight requests get to finish after SIGTERM


class BodyLimitMiddleware:
    """Rejects request bodies over `max_bytes` with 413: at once from Content-Length, or while reading a
    chunked body (the APIError raised from `receive` reaches the handler's exception handling)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await too_big.response()(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_big
            return message

        await self.app(scope, limited_receive, send)


def create_app(
    state: ServerState,
    metrics: ServerMetrics,
    api_key: str | None,
    max_request_bytes: int,
    drain: Drain | None = None,
    dashboard: bool = True,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        state.engine.attach_loop()  # the engine thread was launched (and the model loaded) before the server
        yield
        await state.engine.shutdown()

    app = FastAPI(title="kvserve", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    install_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    if drain is not None:
        app.add_middleware(DrainMiddleware, drain=drain)  # added last: the outermost, so it sees every request
    expected = f"Bearer {api_key}".encode() if api_key else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    auth = [Depends(authorize)]

    public = {"security": []}  # no API key needed, whatever --api-key says
    body_models: list[type[BaseModel]] = []  # every route's request model, for /openapi.json's components

    def body(model: type[BaseModel]) -> dict:
        """A route's request body, declared in /openapi.json (the routes parse their bodies themselves)."""
        body_models.append(model)
        return json_body(model)

    @app.get("/health", responses={503: ERROR_RESPONSES[503]}, openapi_extra=public)
    async def health() -> Response:
        if state.engine.is_alive:
            return JSONResponse({"status": "ok"})
        return APIError(503, "the engine loop is not running", code="engine_unavailable").response()

    @app.get(
        "/metrics",
        responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
        openapi_extra=public,
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth, responses=ERROR_RESPONSES)
    async def models() -> JSONResponse:
        card = ModelCard(
            id=state.model_name, root=next(iter(sorted(state.model_aliases)), None), max_model_len=state.max_model_len
        )
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post(
        "/v1/completions", dependencies=auth, openapi_extra=body(CompletionRequest), responses=GENERATION_RESPONSES
    )
    async def completions(request: Request) -> Response:
        return await create_completion(state, request)

    @app.post(
        "/v1/chat/completions",
        dependencies=auth,
        openapi_extra=body(ChatCompletionRequest),
        responses=GENERATION_RESPONSES,
    )
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(state, request)

    @app.post("/tokenize", dependencies=auth, openapi_extra=body(TokenizeRequest), responses=ERROR_RESPONSES)
    async def tokenize_route(request: Request) -> Response:
        return await tokenize(state, request)

    @app.post("/detokenize", dependencies=auth, openapi_extra=body(DetokenizeRequest), responses=ERROR_RESPONSES)
    async def detokenize_route(request: Request) -> Response:
        return await detokenize(state, request)

    @app.get("/tokenizer_info", dependencies=auth, responses=ERROR_RESPONSES)
    async def tokenizer_info_route() -> Response:
        return await tokenizer_info(state)

    @app.post("/v1/embeddings", dependencies=auth, openapi_extra=body(EmbeddingRequest), responses=ERROR_RESPONSES)
    async def embeddings(request: Request) -> Response:
        return await create_embeddings(state, request)

    @app.post("/v1/responses", dependencies=auth, openapi_extra=body(ResponsesRequest), responses=GENERATION_RESPONSES)
    async def responses(request: Request) -> Response:
        return await create_response(state, request)

    @app.get("/kv_cache", dependencies=auth, responses=ERROR_RESPONSES)
    async def kv_cache_route() -> Response:
        return await kv_cache_info(state)

    @app.get("/kv_cache/blocks", dependencies=auth, responses=ERROR_RESPONSES)
    async def kv_cache_blocks_route() -> Response:
        return await kv_cache_blocks(state)

    if dashboard:
        feed = StateFeed(state)
        browser_auth = [Depends(browser_authorizer(api_key))]

        # Not in /openapi.json: its stream never ends by itself, which schema fuzzers cannot tell apart from a hang.
        @app.get("/v1/kv/state", dependencies=browser_auth, include_in_schema=False)
        async def kv_state(
            request: Request,
            stream: bool = Query(False, description="Server-Sent Events: one state per interval"),
            interval: float = Query(DEFAULT_INTERVAL, ge=MIN_INTERVAL, le=60.0),
            cells: int = Query(MAX_CELLS, ge=16, le=65536, description="the most pool-map cells"),
            roots: int = Query(TREE_ROOTS, ge=0, le=64, description="the largest prefix trees shown"),
        ) -> Response:
            stopping = (lambda: drain.draining) if drain is not None else (lambda: False)
            return await kv_state_route(request, feed, stream, interval, cells, roots, stopping)

        @app.get("/dashboard", dependencies=browser_auth, include_in_schema=False)
        async def dashboard_page() -> Response:
            return dashboard_route()

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> JSONResponse:
        if app.openapi_schema is None:
            fixed = {
                "model": {"anyOf": [{"enum": [state.model_name, *sorted(state.model_aliases)]}, {"type": "null"}]},
                "dimensions": {"anyOf": [{"enum": [state.hidden_size]}, {"type": "null"}]},
            }
            app.openapi_schema = build_openapi(app, body_models, expected is not None, fixed, state.vocab_size)
        return JSONResponse(app.openapi_schema)

    return app


def default_model_name(config: EngineConfig, model_path: str) -> str:
    """--served-model-name, else --model as given, else the default model's file name without .gguf."""
    if config.model:
        return config.model
    return os.path.basename(model_path.rstrip("/")).removesuffix(".gguf")


def run_server(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    import uvicorn

    from kvserve.engine import Engine
    from kvserve.heap import share_one_heap

    share_one_heap()  # before the engine thread starts
    async_engine = AsyncEngine(lambda: Engine(engine_config))
    engine = async_engine.launch()  # loads the model on the engine thread (see async_engine.py for why)
    name = args.served_model_name or default_model_name(engine_config, engine.model_path)
    metrics = ServerMetrics(name)
    async_engine.observer = metrics  # read by the engine thread on its next turn; no request has come yet
    aliases = {
        a
        for a in (engine_config.model, engine.model_path, default_model_name(engine_config, engine.model_path))
        if a and a != name
    }
    state = ServerState(
        engine=async_engine,
        tokenizer=engine.tokenizer,
        model_name=name,
        model_aliases=aliases,
        max_model_len=engine.config.max_model_len,
        tool_call_parser=getattr(args, "tool_call_parser", None),
        hidden_size=engine.model_config.hidden_size,
        vocab_size=engine.model_config.vocab_size,
    )
    api_key = args.api_key or os.environ.get("KVSERVE_API_KEY") or None
    drain = Drain(timeout=getattr(args, "shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT), cut=async_engine.shutdown)
    app = create_app(state, metrics, api_key, args.max_request_bytes, drain, dashboard=getattr(args, "dashboard", True))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=logging.getLevelName(logging.getLogger().level).lower(),
        access_log=False,  # one line per request comes from the engine thread, with its token counts
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )
    server = DrainingServer(config, drain)
    # uvicorn re-raises the signal it caught once it has shut down, through the handler that was installed
    # before it started: make that a no-op so a graceful shutdown exits 0 rather than dying of the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    logger.info("serving %s on http://%s:%d (auth %s)", name, args.host, args.port, "on" if api_key else "off")
    server.run()
    if not server.started:
        return 1  # e.g. the port was taken: uvicorn has logged why
    return 0
