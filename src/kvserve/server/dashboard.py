"""The KV cache dashboard: GET /v1/kv/state (JSON, or Server-Sent Events) and GET /dashboard (the page).

The state (kv_state.py) is built on the engine thread between steps (AsyncEngine.inspect), by one
StateFeed per server whatever the number of viewers: a build younger than MIN_INTERVAL is served again,
so N open dashboards cost the engine one build per interval, never one per step or per viewer.

Auth: server/browser.py (the API key as Bearer, or as Basic auth's password, which a browser asks for).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from kvserve.async_engine import EngineDeadError
from kvserve.kv_state import MAX_CELLS, TREE_ROOTS
from kvserve.server.browser import dashboard_html
from kvserve.server.errors import APIError
from kvserve.server.serving import ServerState, SSEResponse

logger = logging.getLogger("kvserve.server")

MIN_INTERVAL = 0.25  # seconds: the most often the state is built, however many viewers ask
DEFAULT_INTERVAL = 0.5  # the stream's pace (~2 Hz)


class StateFeed:
    """The latest state as JSON text per (cells, roots) asked for, rebuilt when older than MIN_INTERVAL."""

    MAX_KEYS = 8  # distinct (cells, roots) kept; past it the oldest goes

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._lock = asyncio.Lock()
        self._cache: dict[tuple[int, int], tuple[float, str]] = {}  # (cells, roots) -> (built at, JSON)
        self.builds = 0

    async def latest(self, cells: int = MAX_CELLS, roots: int = TREE_ROOTS) -> str:
        async with self._lock:
            key = (cells, roots)
            built, text = self._cache.get(key, (0.0, ""))
            if time.monotonic() - built >= MIN_INTERVAL:
                state = await self.state.engine.inspect(lambda engine: engine.kv_state(cells, roots))
                state["model_name"] = self.state.model_name
                text = json.dumps(state, separators=(",", ":"))
                self._cache.pop(key, None)
                self._cache[key] = (time.monotonic(), text)
                while len(self._cache) > self.MAX_KEYS:
                    del self._cache[next(iter(self._cache))]
                self.builds += 1
            return text


async def kv_state_route(
    request: Request,
    feed: StateFeed,
    stream: bool,
    interval: float,
    cells: int,
    roots: int,
    stopping: Callable[[], bool] = lambda: False,
) -> Response:
    """JSON, or a stream of states every `interval` s that ends when the client leaves, the server starts
    draining (`stopping`: an open dashboard must not hold a shutdown for its whole timeout) or the engine
    dies (an `error` event first). A build that fails sends an `error` event and the stream goes on."""
    try:
        first = await feed.latest(cells, roots)  # a dead engine is a 503 here, not a stream of errors
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_unavailable") from None
    if not stream:
        return Response(first, media_type="application/json")

    async def events():
        text: str | None = first
        while True:
            if text is not None:
                yield f"data: {text}\n\n"
            await asyncio.sleep(interval)
            if stopping() or await request.is_disconnected():
                return
            try:
                text = await feed.latest(cells, roots)
            except EngineDeadError as exc:
                yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
                return
            except Exception as exc:  # noqa: BLE001 - a failed build is reported; the next may succeed
                logger.exception("building the KV state failed")
                yield f"event: error\ndata: {json.dumps({'error': f'{type(exc).__name__}: {exc}'})}\n\n"
                text = None

    return SSEResponse(events())


def dashboard_route() -> HTMLResponse:
    return HTMLResponse(dashboard_html(), headers={"Cache-Control": "no-cache"})
