"""Prometheus metrics (`GET /metrics`), every name prefixed `kvserve:`.

The engine thread updates everything (EngineObserver): gauges are set from the engine after every
loop turn, including turns without a step, so an abort shows in kv_blocks_used at once. The engine's
own counters are cumulative, so ours advance by their difference since the last turn.
prometheus_client is thread-safe; /metrics renders on the asyncio side.

KV blocks "used" are those held by requests; cached-and-evictable blocks count as free, so an idle
server reports 0 used whatever its prefix cache holds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from kvserve.server.stats_log import RequestRecord, stats_snapshot

P = "kvserve:"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # process-wide: the *_created series only add noise here
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.running = Gauge(P + "num_requests_running", "Requests running in the engine", labels, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting to be scheduled", labels, registry=r)
        self.kv_blocks_used = Gauge(P + "kv_blocks_used", "KV blocks held by requests", labels, registry=r)
        self.kv_blocks_total = Gauge(P + "kv_blocks_total", "KV blocks in the pool", labels, registry=r)
        self.kv_usage = Gauge(P + "kv_cache_usage_ratio", "Fraction of KV blocks held by requests", labels, registry=r)
        self.preemptions = Counter(P + "num_preemptions", "Requests preempted", labels, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of accepted requests", labels, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens", labels, registry=r)
        self.prefix_queries = Counter(
            P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels, registry=r
        )
        self.prefix_hits = Counter(
            P + "prefix_cache_hits", "Prompt tokens served by the prefix cache", labels, registry=r
        )
        tier = labels + ["tier"]
        self.offload_hits = Counter(
            P + "kv_offload_hits", "Prefix-cache tokens served by a lower KV tier", tier, registry=r
        )
        self.offload_bytes = Counter(
            P + "kv_offload_bytes",
            "Bytes copied into (in) or loaded from (out) a KV tier",
            tier + ["direction"],
            registry=r,
        )
        self.offload_corrupt = Counter(
            P + "kv_offload_corrupt_blocks",
            "Tier blocks that failed their checksum (served as misses)",
            tier,
            registry=r,
        )
        self.offload_used = Gauge(P + "kv_offload_used_bytes", "Bytes held by a KV tier", tier, registry=r)
        self.offload_capacity = Gauge(P + "kv_offload_capacity_bytes", "Size limit of a KV tier", tier, registry=r)
        self.kv_events_published = Counter(
            P + "kv_events_batches_published",
            "Batches of KV cache events sent (--kv-events-endpoint)",
            labels,
            registry=r,
        )
        self.kv_events_dropped = Counter(
            P + "kv_events_batches_dropped",
            "Batches of KV cache events dropped because the publisher's queue was full",
            labels,
            registry=r,
        )
        self.requests = Counter(
            P + "request_success", "Finished requests by finish reason", labels + ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            P + "time_to_first_token_seconds", "Arrival to first token", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds",
            "Time between tokens of a sequence",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds", "Arrival to last token", labels, buckets=_E2E_BUCKETS, registry=r
        )
        self.model_name = model_name
        for metric in (
            self.running,
            self.waiting,
            self.kv_blocks_used,
            self.kv_blocks_total,
            self.kv_usage,
            self.preemptions,
            self.prompt_tokens,
            self.generation_tokens,
            self.prefix_queries,
            self.prefix_hits,
            self.ttft,
            self.itl,
            self.e2e,
        ):
            metric.labels(model_name)  # every series exists (at 0) from the start, so scrapers see it
        self._last: dict[str, float] = {}
        self._last_prompt_tokens = 0

    # ------------------------------------------------------------------ EngineObserver (engine thread)

    def on_loop(self, engine, num_prompt_tokens_added: int) -> None:
        m = self.model_name
        s = stats_snapshot(engine)
        self.running.labels(m).set(s["running"])
        self.waiting.labels(m).set(s["waiting"])
        self.kv_blocks_used.labels(m).set(s["kv_blocks_used"])
        self.kv_blocks_total.labels(m).set(s["kv_blocks_total"])
        self.kv_usage.labels(m).set(s["kv_usage"])
        for key, counter in (
            ("preemptions", self.preemptions),
            ("generation_tokens", self.generation_tokens),
            ("prefix_cache_queries", self.prefix_queries),
            ("prefix_cache_hits", self.prefix_hits),
            ("kv_events_published", self.kv_events_published),
            ("kv_events_dropped", self.kv_events_dropped),
        ):
            delta = s[key] - self._last.get(key, 0)
            if delta > 0:
                counter.labels(m).inc(delta)
            self._last[key] = s[key]
        for tier, t in s["offload"].items():
            for key, counter, extra in (
                ("hit_tokens", self.offload_hits, ()),
                ("bytes_in", self.offload_bytes, ("in",)),
                ("bytes_out", self.offload_bytes, ("out",)),
                ("corrupt", self.offload_corrupt, ()),
            ):
                delta = t[key] - self._last.get(f"{tier}.{key}", 0)
                if delta > 0:
                    counter.labels(m, tier, *extra).inc(delta)
                self._last[f"{tier}.{key}"] = t[key]
            self.offload_used.labels(m, tier).set(t["used_bytes"])
            self.offload_capacity.labels(m, tier).set(t["capacity_bytes"])
        if num_prompt_tokens_added > self._last_prompt_tokens:
            self.prompt_tokens.labels(m).inc(num_prompt_tokens_added - self._last_prompt_tokens)
            self._last_prompt_tokens = num_prompt_tokens_added

    def on_request_done(self, record: RequestRecord) -> None:
        m = self.model_name
        self.requests.labels(m, record.finish_reason).inc()
        if record.first_token_time is not None:
            self.ttft.labels(m).observe(record.first_token_time - record.arrival_time)
        for gap in record.inter_token_latencies:
            self.itl.labels(m).observe(gap)
        self.e2e.labels(m).observe(record.finish_time - record.arrival_time)

    # ------------------------------------------------------------------ exposition (asyncio side)

    def render(self) -> bytes:
        return generate_latest(self.registry)
