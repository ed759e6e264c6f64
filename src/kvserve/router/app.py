"""The router's HTTP side: the workers' OpenAI endpoints behind one address, each request sent to the worker
its policy chooses (router/policies.py), answers and streams passed through byte for byte.

A request that cannot reach its worker (refused, reset before any answer) is sent to another one, and the
worker is taken out until its health check passes again; one that fails after its answer began ends
there (a stream gets an in-band error event and [DONE], as kvserve's own streams do): the client has
seen part of an answer, which another worker would not continue. No healthy worker: 503.

Every answer carries `x-kvserve-worker`, the worker that served it. /metrics has the router's own
counters: requests per worker, decisions per reason, predicted and actual cached prompt tokens (the
actual from each answer's usage.prompt_tokens_details.cached_tokens: streams report it with
stream_options.include_usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from kvserve.kv.prefix_hash import extend_block_hashes
from kvserve.router.policies import Decision, Policy, RoutedRequest
from kvserve.router.workers import Worker, WorkerPool
from kvserve.server.browser import browser_authorizer, dashboard_html
from kvserve.server.errors import APIError, install_handlers
from kvserve.tokenizer import Tokenizer, chat_template_kwargs

logger = logging.getLogger("kvserve.router")

ROUTED_POSTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
)
_FORWARDED_HEADERS = ("authorization", "content-type", "accept")


class RouterMetrics:
    def __init__(self, policy: str) -> None:
        self.registry = r = CollectorRegistry()
        P = "kvserve_router:"
        self.policy = policy
        self.requests = Counter(P + "requests", "Requests sent to each worker", ["worker"], registry=r)
        self.decisions = Counter(
            P + "decisions", "Routing decisions by policy and reason", ["policy", "reason"], registry=r
        )
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of routed requests", ["worker"], registry=r)
        self.predicted_cached = Counter(
            P + "predicted_cached_tokens", "Prompt tokens the index said the worker held", ["worker"], registry=r
        )
        self.actual_cached = Counter(
            P + "actual_cached_tokens", "Cached prompt tokens the worker's answer reported", ["worker"], registry=r
        )
        self.retries = Counter(P + "retries", "Requests sent again after their worker could not be reached", registry=r)
        self.unrouted = Counter(P + "no_healthy_worker", "Requests answered 503: no worker was up", registry=r)
        self.healthy = Gauge(P + "worker_healthy", "1 if the worker passes its health check", ["worker"], registry=r)
        self.in_flight = Gauge(
            P + "worker_in_flight", "Requests the router has in flight there", ["worker"], registry=r
        )

    def render(self, workers: list[Worker]) -> bytes:
        for w in workers:
            self.healthy.labels(w.url).set(1 if w.healthy else 0)
            self.in_flight.labels(w.url).set(w.in_flight)
        return generate_latest(self.registry)


class Router:
    stopping = False  # set at shutdown: relayed dashboard streams end (they would hold it up forever)

    def __init__(self, pool: WorkerPool, policy: Policy, tokenizer: Tokenizer | None, metrics: RouterMetrics) -> None:
        self.pool = pool
        self.policy = policy
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_connections=None)
        )

    # ---- what the policy sees of a request

    def prompt_ids(self, path: str, body: Any) -> list[int]:
        """The request's prompt as the worker will tokenize it; [] when unknown (routing then goes by load)."""
        if not isinstance(body, dict):
            return []
        try:
            if path == "/v1/chat/completions" and self.tokenizer is not None:
                return self._chat_ids(body)
            prompt = body.get("prompt") if path == "/v1/completions" else None
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                prompt = prompt[0]  # several prompts go to one worker: route by the first
            if isinstance(prompt, str) and self.tokenizer is not None:
                return self.tokenizer.encode(prompt)
            if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return prompt
        except (ValueError, TypeError):  # the worker answers the bad request with its 400
            pass
        return []

    def _chat_ids(self, body: dict) -> list[int]:
        """The chat as the worker renders it (server/serving.py chat_prompt_ids), for the fields that decide the
        text; a request with tools is routed by its messages alone (its tools change the text the worker sees)."""
        return self.tokenizer.apply_chat_template(
            body.get("messages"),
            body.get("add_generation_prompt", True),
            body.get("continue_final_message", False),
            **chat_template_kwargs(body.get("chat_template_kwargs")),
        )

    def routed_request(self, path: str, body: Any) -> tuple[RoutedRequest, int]:
        ids = self.prompt_ids(path, body)
        hashes: dict[bytes, list[bytes]] = {}
        block_size = 16
        for worker in self.pool.healthy():
            if worker.root_hash is None or worker.root_hash in hashes:
                continue
            block_size = worker.block_size
            chain: list[bytes] = []
            extend_block_hashes(chain, worker.root_hash, lambda a, b: ids[a:b], len(ids), block_size)
            hashes[worker.root_hash] = chain
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") if isinstance(body, dict) else None
        out_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 0
        prompt_blocks = -(-len(ids) // block_size)
        return RoutedRequest(hashes, prompt_blocks, -(-(len(ids) + out_tokens) // block_size)), len(ids)

    # ---- forwarding

    async def forward(self, request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        routed, num_prompt = await asyncio.to_thread(self.routed_request, path, body)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        tried: set[Worker] = set()
        while True:
            candidates = [w for w in self.pool.healthy() if w not in tried]
            if not candidates:
                self.metrics.unrouted.inc()
                return APIError(503, "no healthy worker to serve this request", code="no_healthy_worker").response()
            decision = self.policy.choose(candidates, routed)
            worker = decision.worker
            worker.in_flight += 1
            worker.active_blocks += routed.num_blocks

            def release(worker: Worker = worker) -> None:
                worker.in_flight -= 1
                worker.active_blocks -= routed.num_blocks

            try:
                upstream = await self.client.send(
                    self.client.build_request(request.method, worker.url + path, content=raw, headers=headers),
                    stream=True,
                )
            except httpx.TransportError as exc:  # nothing reached the client: another worker may serve it
                release()
                logger.warning("worker %s unreachable (%s): taken out, request sent elsewhere", worker.url, exc)
                self.pool.mark_down(worker)
                tried.add(worker)
                self.metrics.retries.inc()
                continue
            self._count(decision, num_prompt, routed)
            return await self._relay(upstream, worker, release)

    async def proxy(self, request: Request, path: str, worker_index: int | None) -> Response:
        """A GET passed to one worker as it is (its query string, its auth header): the worker given by its
        index in --worker order, else the first healthy one. For the KV dashboard, whose state is one
        engine's: the page picks the worker."""
        workers = self.pool.workers
        if worker_index is not None:
            if not 0 <= worker_index < len(workers):
                return APIError(400, f"worker must be in [0, {len(workers)})", param="worker").response()
            worker = workers[worker_index]
        else:
            healthy = self.pool.healthy()
            if not healthy:
                return APIError(503, "no healthy worker", code="no_healthy_worker").response()
            worker = healthy[0]
        query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "worker"])
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        url = worker.url + path + (f"?{query}" if query else "")
        try:
            upstream = await self.client.send(self.client.build_request("GET", url, headers=headers), stream=True)
        except httpx.TransportError as exc:
            return APIError(502, f"worker {worker.url} unreachable: {exc}", code="worker_failed").response()
        relayed = {"x-kvserve-worker": worker.url}
        relayed |= {k: v for k, v in upstream.headers.items() if k.lower() in ("www-authenticate", "cache-control")}
        media_type = upstream.headers.get("content-type", "application/json")

        async def body() -> AsyncIterator[bytes]:  # as it comes; closed when the client leaves, or the router stops
            try:
                async for chunk in upstream.aiter_raw():
                    if self.stopping:
                        return
                    yield chunk
            except httpx.TransportError:
                return
            finally:
                await upstream.aclose()

        return StreamingResponse(body(), upstream.status_code, headers=relayed, media_type=media_type)

    def _count(self, decision: Decision, num_prompt: int, routed: RoutedRequest) -> None:
        url = decision.worker.url
        self.metrics.requests.labels(url).inc()
        self.metrics.decisions.labels(self.policy.name, decision.reason).inc()
        self.metrics.prompt_tokens.labels(url).inc(num_prompt)
        block_size = decision.worker.block_size or 16
        # the engine serves at most (prompt - 1) // block_size blocks from its cache: the last token is computed
        predicted = min(decision.predicted_cached_blocks, max(0, (num_prompt - 1) // block_size))
        self.metrics.predicted_cached.labels(url).inc(predicted * block_size)

    async def _relay(self, upstream: httpx.Response, worker: Worker, release: Callable[[], None]) -> Response:
        headers = {"x-kvserve-worker": worker.url}
        if "www-authenticate" in upstream.headers:  # the worker's challenge (a browser asks for the key)
            headers["www-authenticate"] = upstream.headers["www-authenticate"]
        media_type = upstream.headers.get("content-type", "application/json")
        if not media_type.startswith("text/event-stream"):
            try:
                content = await upstream.aread()
            except httpx.TransportError as exc:
                release()
                self.pool.mark_down(worker)
                return APIError(502, f"worker {worker.url} failed mid-answer: {exc}", code="worker_failed").response()
            finally:
                await upstream.aclose()
            release()
            self._record_usage(worker, content)
            return Response(content, upstream.status_code, headers=headers, media_type=media_type)
        return StreamingResponse(
            self._stream(upstream, worker, release), upstream.status_code, headers=headers, media_type=media_type
        )

    async def _stream(
        self, upstream: httpx.Response, worker: Worker, release: Callable[[], None]
    ) -> AsyncIterator[bytes]:
        tail = b""  # the last, unfinished line: usage is read from whole `data:` lines
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                for line in lines:
                    if line.startswith(b"data: {") and b'"cached_tokens"' in line:
                        self._record_usage(worker, line[6:])
        except httpx.TransportError as exc:
            self.pool.mark_down(worker)
            error = {
                "error": {
                    "message": f"worker {worker.url} failed mid-stream: {exc}",
                    "type": "server_error",
                    "code": "worker_failed",
                }
            }
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            release()
            await upstream.aclose()

    def _record_usage(self, worker: Worker, content: bytes) -> None:
        try:
            usage = json.loads(content).get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        except (ValueError, AttributeError):
            return
        if cached:
            self.metrics.actual_cached.labels(worker.url).inc(cached)


def create_router_app(router: Router, api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.pool.start()
        yield
        router.stopping = True
        await router.pool.stop()
        await router.client.aclose()

    app = FastAPI(title="kvserve router", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    install_handlers(app)  # an APIError raised in a route (the dashboard's 401) answers as the server's do

    # the GETs: the workers' answer (they serve one model)
    routes = [(path, "POST") for path in ROUTED_POSTS] + [("/v1/models", "GET"), ("/tokenizer_info", "GET")]
    for path, method in routes:

        async def routed(request: Request, path: str = path) -> Response:
            return await router.forward(request, path)

        app.add_api_route(path, routed, methods=[method])

    # The KV dashboard: the page (behind the router's --api-key, which the workers share), offering a choice
    # of worker, and one worker's state (?worker=N, in --worker order; default: the first healthy one).
    @app.get("/dashboard", dependencies=[Depends(browser_authorizer(api_key))])
    async def dashboard() -> Response:
        return HTMLResponse(dashboard_html(router=True), headers={"Cache-Control": "no-cache"})

    @app.get("/v1/kv/state")
    async def kv_state(request: Request, worker: int | None = None) -> Response:
        return await router.proxy(request, "/v1/kv/state", worker)

    @app.get("/health")
    async def health() -> Response:
        healthy = router.pool.healthy()
        if healthy:
            return JSONResponse({"status": "ok", "workers": len(healthy)})
        return APIError(503, "no worker is healthy", code="no_healthy_worker").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(router.pool.workers), media_type=CONTENT_TYPE_LATEST)

    @app.get("/workers")
    async def workers(blocks: bool = True) -> JSONResponse:
        """Each worker's state as the router sees it, with (unless blocks=false) the block hashes its index
        holds per medium."""
        return JSONResponse(
            [
                {
                    "url": w.url,
                    "healthy": w.healthy,
                    "in_flight": w.in_flight,
                    "running": w.running,
                    "waiting": w.waiting,
                    "kv_events": w.subscriber is not None,
                    **(
                        {
                            "blocks": {
                                m: sorted(h.hex() for h in held)
                                for m, held in router.pool.index.snapshot(w.url).items()
                            }
                        }
                        if blocks
                        else {}
                    ),
                }
                for w in router.pool.workers
            ]
        )

    return app
