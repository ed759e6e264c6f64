"""The router's workers: their health, their load, and their KV layout.

A health check runs every `interval` seconds per worker: GET /health, then /metrics (running and waiting
requests). A worker that fails it is taken out at once (and its KV index dropped: a worker that comes back
is a new process with a new cache); one that passes again is taken back in, after GET /kv_cache has
told the router its block size, its prefix-hash root and where its KV events are, and a subscriber
follows them (router/index.py). A request that cannot reach a worker also takes it out (mark_down), so
the next requests do not wait for the next check.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families

from kvserve.router.index import EventSubscriber, KVIndex

if TYPE_CHECKING:  # httpx (and the rich it pulls in, ~6 MB) is imported when a router starts: `kvserve serve`
    import httpx  # imports this module through the CLI's argument parser, and never checks workers

logger = logging.getLogger("kvserve.router")


@dataclass(eq=False)
class Worker:
    url: str
    healthy: bool = False
    in_flight: int = 0  # requests the router has sent there and not seen end
    active_blocks: int = 0  # the KV blocks those requests need there (prompt + max_tokens), the router's estimate
    running: int = 0  # from the worker's /metrics at the last check
    waiting: int = 0
    block_size: int | None = None
    root_hash: bytes | None = None
    subscriber: EventSubscriber | None = field(default=None, repr=False)

    @property
    def load(self) -> int:
        """Requests there now: the router's own count (exact for traffic through this router), or the
        worker's if other clients send it more."""
        return max(self.in_flight, self.running + self.waiting)


def _events_address(endpoint: str, worker_url: str) -> str:
    """A worker bound to tcp://*:PORT or tcp://0.0.0.0:PORT is reached at its URL's host."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if host in ("*", "0.0.0.0", "[::]", "::"):
        host = urlparse(worker_url).hostname or "127.0.0.1"
    return f"{scheme}://{host}:{port}"


class WorkerPool:
    def __init__(
        self,
        urls: list[str],
        index: KVIndex,
        interval: float = 1.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("the router needs at least one --worker URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a worker is listed twice: {urls}")
        self.workers = [Worker(url.rstrip("/")) for url in urls]
        self.index = index
        self.interval = interval
        self.headers = headers or {}  # the workers' API key, if they need one
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    async def start(self) -> None:
        import httpx

        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0), headers=self.headers)
        await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for worker in self.workers:
            self._drop_events(worker)
        if self._client is not None:
            await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers))

    async def check(self, worker: Worker) -> None:
        import httpx

        try:
            health = await self._client.get(worker.url + "/health")
            if health.status_code != 200:
                raise httpx.HTTPError(f"/health answered {health.status_code}")
            if not worker.healthy:
                await self._take_in(worker)
            metrics = await self._client.get(worker.url + "/metrics")
            worker.running, worker.waiting = _queue_lengths(metrics.text)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            if worker.healthy:
                logger.warning("worker %s is down (%s): taken out", worker.url, exc)
            self.mark_down(worker)

    async def _take_in(self, worker: Worker) -> None:
        info = (await self._client.get(worker.url + "/kv_cache")).raise_for_status().json()
        worker.block_size = int(info["block_size"])
        worker.root_hash = bytes.fromhex(info["root_hash"])
        self._drop_events(worker)
        events = info.get("kv_events")
        if events is not None:
            worker.subscriber = EventSubscriber(
                worker.url,
                _events_address(events["endpoint"], worker.url),
                _events_address(events["replay_endpoint"], worker.url),
                events["topic"],
                self.index,
            )
        worker.healthy = True
        logger.info("worker %s is up (KV events %s)", worker.url, "on" if events else "off: no prefix routing")

    def mark_down(self, worker: Worker) -> None:
        worker.healthy = False
        self._drop_events(worker)

    def _drop_events(self, worker: Worker) -> None:
        if worker.subscriber is not None:
            worker.subscriber.stop()
            worker.subscriber = None
        self.index.clear(worker.url)


def _queue_lengths(text: str) -> tuple[int, int]:
    values = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("kvserve:num_requests_running", "kvserve:num_requests_waiting"):
            values[family.name] = int(sum(s.value for s in family.samples))
    return values["kvserve:num_requests_running"], values["kvserve:num_requests_waiting"]
