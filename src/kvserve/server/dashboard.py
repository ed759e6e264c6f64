"""The KV cache dashboard: GET /v1/kv/state (JSON, or Server-Sent Events) and GET /dashboard (the page).

The state (kv_state.py) is built on the engine thread between steps (AsyncEngine.inspect), by one
StateFeed per server whatever the number of viewers: a build younger than MIN_INTERVAL is served again,
so N open dashboards cost the engine one build per interval, never one per step or per viewer.

Auth: server/browser.py (the API key as Bearer, or as Basic auth's password, which a browser asks for).
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from kvserve.async_engine import EngineDeadError
from kvserve.kv_state import MAX_CELLS, TREE_ROOTS
from kvserve.server.browser import dashboard_html
from kvserve.server.errors import APIError
from kvserve.server.serving import ServerState, SSEResponse

MIN_INTERVAL = 0.25  # seconds: the most often the state is built, however many viewers ask
DEFAULT_INTERVAL = 0.5  # the stream's pace (~2 Hz)


class StateFeed:
    """The latest state as JSON text, rebuilt when older than MIN_INTERVAL."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._lock = asyncio.Lock()
        self._key: tuple[int, int] | None = None
        self._built = 0.0
        self._text = ""
        self.builds = 0

    async def latest(self, cells: int = MAX_CELLS, roots: int = TREE_ROOTS) -> str:
        async with self._lock:
            now = time.monotonic()
            if self._key != (cells, roots) or now - self._built >= MIN_INTERVAL:
                state = await self.state.engine.inspect(lambda engine: engine.kv_state(cells, roots))
                state["model_name"] = self.state.model_name
                self._text = json.dumps(state, separators=(",", ":"))
                self._key, self._built = (cells, roots), time.monotonic()
                self.builds += 1
            return self._text


async def kv_state_route(
    request: Request, feed: StateFeed, stream: bool, interval: float, cells: int, roots: int
) -> Response:
    if not stream:
        try:
            return Response(await feed.latest(cells, roots), media_type="application/json")
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from None

    async def events():
        while not await request.is_disconnected():
            try:
                text = await feed.latest(cells, roots)
            except EngineDeadError as exc:
                yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
                return
            yield f"data: {text}\n\n"
            await asyncio.sleep(interval)

    return SSEResponse(events())


def dashboard_route() -> HTMLResponse:
    return HTMLResponse(dashboard_html(), headers={"Cache-Control": "no-cache"})
