"""Graceful shutdown: SIGTERM (or SIGINT) starts a drain, and the process exits once it is over.

While draining, the listening socket stays open and every new request is answered at once with 503
`shutting_down` (and `Connection: close`), /health included, so that a load balancer or router takes
this server out instead of seeing connections refused; /metrics still answers. Requests already in
flight run on. The drain ends when none is left. If --shutdown-timeout passes first, the engine is
shut down, which ends every request still running with an error the client can read (an SSE error
event then [DONE], or a 503 body: "the server is shutting down"), and the drain waits up to
SHUTDOWN_GRACE more for those answers to go out. Then uvicorn's own shutdown closes the socket and
the connections, and the process exits 0. A second signal skips the rest of the drain.

Invariant: `in_flight` counts the HTTP requests admitted (not refused by the drain) whose response
has not finished, streams until their last byte; it is only touched on the event loop's thread.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from kvserve.server.errors import APIError

logger = logging.getLogger("kvserve.server")

ALWAYS_ANSWERED = frozenset({"/metrics"})  # paths served normally during a drain
SHUTDOWN_GRACE = 1.0  # seconds the requests cut at the timeout get to send their error, and uvicorn's own grace


@dataclass
class Drain:
    timeout: float  # --shutdown-timeout: how long in-flight requests get once the drain has begun
    cut: Callable[[], Awaitable[None]]  # ends every request still running (the engine's shutdown)
    in_flight: int = 0
    deadline: float | None = None  # time.monotonic() at which the drain cuts; None until a signal
    was_cut: bool = False

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    async def over(self) -> bool:
        """Whether the process may exit now; cuts the requests left once the timeout has passed."""
        if self.deadline is None:
            return False
        now = time.monotonic()
        if self.in_flight == 0 or now >= self.deadline + SHUTDOWN_GRACE:
            return True
        if now >= self.deadline and not self.was_cut:
            self.was_cut = True
            logger.warning("shutdown timeout: ending %d request(s) still in flight", self.in_flight)
            await self.cut()
        return False


class DrainMiddleware:
    """Counts the requests in flight; refuses new ones with 503 once the drain has begun."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["path"] not in ALWAYS_ANSWERED:
            refusal = APIError(503, "the server is shutting down; retry on another server", code="shutting_down")
            response = refusal.response()
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT begins a drain instead of closing the socket; its
    config's timeout_graceful_shutdown is then only the grace given after the drain (see module doc)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining:  # a second signal: stop waiting for the in-flight requests
            super().handle_exit(sig, frame)
            return
        self.drain.begin()
        logger.info(
            "%s: draining %d request(s) for up to %.0f s; new requests get 503",
            signal.Signals(sig).name,
            self.drain.in_flight,
            self.drain.timeout,
        )

    async def on_tick(self, counter: int) -> bool:
        if not self.should_exit and await self.drain.over():
            self.should_exit = True
        return await super().on_tick(counter)
