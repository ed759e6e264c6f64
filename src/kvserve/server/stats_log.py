"""What the engine thread reports: RequestRecord and EngineObserver (for metrics), and two log lines,
one per finished request and a periodic engine line:

    request cmpl-..-0: prompt 128 tokens (64 cached), output 128 tokens, TTFT 0.412s, e2e 3.100s, 41.3 tokens/s,
        finish length
    engine: running 32, waiting 4, KV usage 61.0% (222/364 blocks), prefix cache hit rate 38.5%,
        prompt 812.0 tokens/s, generation 130.2 tokens/s, preemptions 0
    engine: KV tiers: host tier hits 4096 tokens, 35% of 8192 MiB, disk tier hits 512 tokens, 2% of 51200 MiB
        (only with --kv-offload-memory / --kv-offload-dir)

The periodic line covers a busy period only: its rates are measured from when the engine last became busy
or last logged, and one final line follows the engine falling idle; an idle server logs nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvserve.engine import Engine

logger = logging.getLogger("kvserve.async_engine")


@dataclass
class RequestRecord:
    """What the observer and the per-request log line get when a request leaves the engine.
    Times are time.monotonic(); arrival is when the HTTP layer submitted it."""

    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    arrival_time: float
    first_token_time: float | None
    finish_time: float
    finish_reason: str
    inter_token_latencies: list[float]


class EngineObserver(Protocol):
    """Called on the engine thread (so it may read the engine): after every loop turn, and per finished request."""

    def on_loop(self, engine: Engine, num_prompt_tokens_added: int) -> None: ...

    def on_request_done(self, record: RequestRecord) -> None: ...


def stats_snapshot(engine: Engine) -> dict[str, float]:
    """Engine gauges and counters as plain numbers; read them on the engine thread only."""
    pool = engine.kv.pool
    events = getattr(engine, "kv_events", None)
    return {
        "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting),
        "kv_blocks_total": pool.num_blocks,
        "kv_blocks_used": pool.num_blocks - pool.num_free_blocks,  # cached-and-evictable blocks count as free
        "kv_usage": pool.usage,
        "preemptions": engine.scheduler.num_preemptions,
        "generation_tokens": engine.stats.num_generated_tokens,
        "prefix_cache_queries": engine.kv.stats.queries,
        "prefix_cache_hits": engine.kv.stats.hits,
        "offload": engine.kv.offload.stats() if engine.kv.offload is not None else {},
        "kv_events_published": events.num_published if events is not None else 0,
        "kv_events_dropped": events.num_dropped if events is not None else 0,
    }


def log_request(record: RequestRecord) -> None:
    e2e = record.finish_time - record.arrival_time
    ttft = "-" if record.first_token_time is None else f"{record.first_token_time - record.arrival_time:.3f}s"
    logger.info(
        "request %s: prompt %d tokens (%d cached), output %d tokens, TTFT %s, e2e %.3fs, %.1f tokens/s, finish %s",
        record.request_id,
        record.num_prompt_tokens,
        record.num_cached_tokens,
        record.num_output_tokens,
        ttft,
        e2e,
        record.num_output_tokens / e2e if e2e > 0 else 0.0,
        record.finish_reason,
    )


class PeriodicStats:
    """Decides when the engine line is due; `interval` <= 0 turns it off."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.busy = False  # stepped since the last line
        self._mark = (time.monotonic(), 0, 0)  # (time, generated tokens, prompt tokens) the rates start from

    def turn_started(self, engine: Engine, prompt_tokens: int) -> None:
        if not self.busy:  # a busy period starts here
            self._mark = (time.monotonic(), engine.stats.num_generated_tokens, prompt_tokens)

    def idle_timeout(self) -> float | None:
        """How long an idle engine thread may sleep: until the final line is due, or forever."""
        return self.interval if self.busy and self.interval > 0 else None

    def maybe_log(self, engine: Engine, prompt_tokens: int) -> None:
        if self.interval <= 0 or not self.busy:
            return
        now = time.monotonic()
        last, last_generated, last_prompt = self._mark
        if now - last < self.interval:
            return
        s = stats_snapshot(engine)
        elapsed = now - last
        logger.info(
            "engine: running %d, waiting %d, KV usage %.1f%% (%d/%d blocks), prefix cache hit rate %.1f%%, "
            "prompt %.1f tokens/s, generation %.1f tokens/s, preemptions %d",
            s["running"],
            s["waiting"],
            100 * s["kv_usage"],
            s["kv_blocks_used"],
            s["kv_blocks_total"],
            100 * engine.kv.stats.hit_rate,
            (prompt_tokens - last_prompt) / elapsed,
            (s["generation_tokens"] - last_generated) / elapsed,
            s["preemptions"],
        )
        if engine.kv.offload is not None:
            logger.info("engine: KV tiers: %s", engine.kv.offload.summary())
        self._mark = (now, s["generation_tokens"], prompt_tokens)
        self.busy = engine.has_unfinished()
