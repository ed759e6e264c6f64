"""The KV cache's live state, as one JSON-ready dict: what `GET /v1/kv/state`, the dashboard
(`GET /dashboard`) and `kvserve top` show.

It is built on request, at most a few times a second and never per step, from what the engine holds
anyway: the block pool's blocks and free queue (whose order is the LRU eviction order), the
scheduler's queues, the tiers' counters. The rates (hit rate over the last minute, preemptions per
minute, tier traffic, the step time split) come from the difference between this build's counters
and those of earlier builds, kept for a minute by a KVStateTracker. The only per-step cost is three
clock reads (EngineStats' step split) and one counter per prefix hit (Block.hits).

Shape (every key always present):
- pool: block counts by state, and `cells`: one [in use, cached, free, recency] per block, or per bin
  of `blocks_per_cell` blocks past MAX_CELLS blocks (counts; recency is the cached blocks' mean place
  in the eviction order, 0 = next to go, 1 = freed last, -1 without cached blocks); `owners` maps a
  cell index to the first OWNERS_SHOWN requests holding its blocks (`owner_counts`: how many, past that).
- tiers: per lower tier, blocks held and capacity, hits and traffic.
- prefix_tree: the cached blocks (evictable or held) as a forest of block runs (a run: blocks that
  follow each other with no branching), the TREE_ROOTS largest trees, each node with its first and
  last block and length, tokens, hits (prefix-cache hits on its first block, a preempted request's
  re-admission included), the text of its first TEXT_TOKENS tokens, whether a running request holds
  it, and `children_cut` (children left out past the TREE_NODES budget, which is shared out
  breadth-first: every shown tree's top levels before any tree's deeper ones).
- requests: running, waiting and preempted sequences.
- gauges and series: rates over the last minute, the step time split, recent TTFTs and tokens/s.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvserve.engine import Engine
    from kvserve.kv.block_pool import Block

MAX_CELLS = 4096  # pool map cells; larger pools are binned
TREE_ROOTS = 8  # the largest prefix trees shown
TREE_NODES = 200  # at most this many nodes in all (a tree is cut breadth-first past it)
TEXT_TOKENS = 8  # tokens of a run's text shown
WINDOW_SECONDS = 60.0
RATE_SECONDS = 1.0  # tokens/s is measured against the newest sample at least this much older
SERIES_POINTS = 120
OWNERS_SHOWN = 6  # request ids listed per pool cell (the rest counted)


@dataclass
class _Counters:
    time: float
    steps: int
    schedule: float
    forward: float
    sample: float
    queries: int
    hits: int
    preemptions: int
    generated: int
    tier_in: int
    tier_out: int


class KVStateTracker:
    """The counters of the builds of the last minute, and recent finished requests' TTFTs."""

    def __init__(self) -> None:
        self.samples: deque[_Counters] = deque()
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=SERIES_POINTS)  # (finish time, seconds)
        self.throughput: deque[tuple[float, float]] = deque(maxlen=SERIES_POINTS)  # (time, output tok/s)

    def record_ttft(self, finished_at: float, ttft: float) -> None:
        """Called once per finished request (AsyncEngine): O(1)."""
        self.ttfts.append((finished_at, ttft))

    def build(self, engine: Engine, max_cells: int = MAX_CELLS, tree_roots: int = TREE_ROOTS) -> dict[str, Any]:
        now = time.time()
        counters = _counters(engine, time.monotonic())  # rates: a monotonic clock (the wall clock may step)
        while self.samples and counters.time - self.samples[0].time > WINDOW_SECONDS:
            self.samples.popleft()  # after an idle hour the first build's rates start afresh
        self.samples.append(counters)
        gauges = self._gauges(engine, counters)
        if gauges["tokens_per_s"] is not None:
            self.throughput.append((now, gauges["tokens_per_s"]))
        return {
            "time": now,
            "model": engine.model_path,
            "pool": pool_state(engine, max_cells),
            "tiers": tier_state(engine),
            "prefix_tree": prefix_tree(engine, tree_roots),
            "requests": request_state(engine),
            "gauges": gauges,
            "series": {"ttft_s": list(self.ttfts), "tokens_per_s": list(self.throughput)},
        }

    def _gauges(self, engine: Engine, now: _Counters) -> dict[str, Any]:
        first = self.samples[0]
        # tokens/s against a sample at least RATE_SECONDS older: builds milliseconds apart (a script's
        # kv_state() beside a viewer's) would divide one step's tokens by a millisecond
        last = next((s for s in reversed(self.samples) if now.time - s.time >= RATE_SECONDS), None)
        minutes = (now.time - first.time) / 60
        queries = now.queries - first.queries
        steps = now.steps - first.steps
        split = {
            part: 1000 * (getattr(now, part) - getattr(first, part)) / steps if steps else None
            for part in ("schedule", "forward", "sample")
        }
        per_second = now.time - first.time
        recent = now.time - last.time if last is not None else 0
        return {
            "kv_usage": engine.kv.pool.usage,
            "hit_rate_1m": (now.hits - first.hits) / queries if queries else None,
            "preemptions_per_min": (now.preemptions - first.preemptions) / minutes if minutes > 0 else None,
            "tier_in_bytes_per_s": (now.tier_in - first.tier_in) / per_second if per_second > 0 else None,
            "tier_out_bytes_per_s": (now.tier_out - first.tier_out) / per_second if per_second > 0 else None,
            "step_ms": split,
            "steps_1m": steps,
            "tokens_per_s": (now.generated - last.generated) / recent if recent > 0 else None,
            "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting),
        }


def _counters(engine: Engine, now: float) -> _Counters:
    stats, kv = engine.stats, engine.kv
    tier_in = tier_out = 0
    if kv.offload is not None:
        for tier in kv.offload.tiers:
            tier_in += tier.stats.bytes_in
            tier_out += tier.stats.bytes_out
    return _Counters(
        now,
        stats.num_steps,
        stats.schedule_seconds,
        stats.forward_seconds,
        stats.sample_seconds,
        kv.stats.queries,
        kv.stats.hits,
        engine.scheduler.num_preemptions,
        stats.num_generated_tokens,
        tier_in,
        tier_out,
    )


# ---------------------------------------------------------------- the pool map


def pool_state(engine: Engine, max_cells: int = MAX_CELLS) -> dict[str, Any]:
    pool = engine.kv.pool
    n = pool.num_blocks
    per_cell = -(-n // max_cells)
    num_cells = -(-n // per_cell)
    cells = [[0, 0, 0, 0.0] for _ in range(num_cells)]
    cached_rank: dict[int, int] = {}  # block id -> its place among the cached blocks of the free queue
    for block in pool.free_queue:
        if block.block_hash is not None:
            cached_rank[block.block_id] = len(cached_rank)
    num_cached = len(cached_rank)
    for block in pool.blocks:
        cell = cells[block.block_id // per_cell]
        if block.ref_count > 0:
            cell[0] += 1
        elif block.block_id in cached_rank:
            cell[1] += 1
            cell[3] += cached_rank[block.block_id] / max(1, num_cached - 1)
        else:
            cell[2] += 1
    for cell in cells:
        cell[3] = round(cell[3] / cell[1], 3) if cell[1] else -1
    holders: dict[int, dict[str, None]] = {}  # cell -> request ids in the order met (a dict: O(1) membership)
    for key, blocks in engine.kv.block_tables.items():
        request_id = key.rsplit("#", 1)[0]  # the key is f"{request_id}#{index}"
        for block in blocks:
            holders.setdefault(block.block_id // per_cell, {})[request_id] = None
    owners = {cell: list(ids)[:OWNERS_SHOWN] for cell, ids in holders.items()}
    owner_counts = {cell: len(ids) for cell, ids in holders.items() if len(ids) > OWNERS_SHOWN}
    in_use = sum(c[0] for c in cells)
    return {
        "num_blocks": n,
        "block_size": engine.kv.block_size,
        "blocks_per_cell": per_cell,
        "in_use": in_use,
        "cached": num_cached,
        "free": n - in_use - num_cached,
        "usage": pool.usage,
        "cells": cells,
        "owners": {str(cell): ids for cell, ids in sorted(owners.items())},  # at most OWNERS_SHOWN a cell ...
        "owner_counts": {str(cell): n for cell, n in sorted(owner_counts.items())},  # ... of these many
    }


def tier_state(engine: Engine) -> list[dict[str, Any]]:
    offload = engine.kv.offload
    if offload is None:
        return []
    row = offload.io.row_nbytes
    return [
        {
            "name": tier.name,
            "blocks": tier.used_bytes // row,
            "capacity_blocks": tier.capacity_bytes // row,
            "used_bytes": tier.used_bytes,
            "capacity_bytes": tier.capacity_bytes,
            **vars(tier.stats),
        }
        for tier in offload.tiers
    ]


# ---------------------------------------------------------------- the prefix tree


def prefix_tree(engine: Engine, max_roots: int = TREE_ROOTS) -> dict[str, Any]:
    """The device's cached blocks as trees of runs, by the hash chain (a block's parent is the block
    before it in its sequence; a block whose parent is no longer cached starts a tree of its own)."""
    pool = engine.kv.pool
    cached = [b for b in pool.blocks if b.block_hash is not None]
    by_hash = {b.block_hash: b for b in cached}
    children: dict[bytes | None, list[Block]] = {}
    for block in cached:
        parent = block.parent_hash if block.parent_hash in by_hash else None
        children.setdefault(parent, []).append(block)
    sizes: dict[bytes, int] = {}

    def size(block: Block) -> int:  # blocks in the tree under (and with) block; iterative: chains are long
        stack, order = [block], []
        while stack:
            b = stack.pop()
            order.append(b)
            stack.extend(children.get(b.block_hash, ()))
        for b in reversed(order):
            sizes[b.block_hash] = 1 + sum(sizes[c.block_hash] for c in children.get(b.block_hash, ()))
        return sizes[block.block_hash]

    roots = sorted(children.get(None, []), key=lambda b: (-size(b), b.block_id))[:max_roots]
    shown = [_node(engine, root, children, sizes) for root in roots]
    # Breadth-first over all shown trees: each level's nodes get children before any deeper node does.
    level = list(shown)
    budget = TREE_NODES - len(shown)
    while level and budget > 0:
        below = []
        for node in level:
            for kid in node.pop("_kids"):
                if budget <= 0:
                    node["children_cut"] += 1
                    continue
                child = _node(engine, kid, children, sizes)
                node["children"].append(child)
                below.append(child)
                budget -= 1
        level = below
    for node in level:  # the last level reached: what is left under it is cut
        node["children_cut"] += len(node.pop("_kids"))
    return {
        "num_cached_blocks": len(cached),
        "num_trees": len(children.get(None, [])),
        "roots": shown,
    }


def _node(engine: Engine, first: Block, children: dict, sizes: dict) -> dict:
    """One run from `first` (blocks chained with no branching); its children to expand in `_kids`."""
    run = [first]
    while len(kids := children.get(run[-1].block_hash, ())) == 1:
        run.append(kids[0])
    return {
        "first_block": first.block_id,
        "last_block": run[-1].block_id,
        "num_blocks": len(run),
        "tokens": len(run) * len(first.token_ids),
        "hits": first.hits,
        "blocks_under": sizes[first.block_hash],
        "in_use": any(b.ref_count > 0 for b in run),
        "text": _text(engine, list(first.token_ids[:TEXT_TOKENS])),
        "children": [],
        "children_cut": 0,
        "_kids": sorted(children.get(run[-1].block_hash, ()), key=lambda b: (-sizes[b.block_hash], b.block_id)),
    }


def _text(engine: Engine, token_ids: list[int]) -> str:
    if engine.tokenizer is None:
        return " ".join(map(str, token_ids))
    return engine.tokenizer.decode(token_ids, skip_special_tokens=False)


# ---------------------------------------------------------------- requests


def request_state(engine: Engine) -> list[dict[str, Any]]:
    now = time.monotonic()
    rows = []
    queues = [(r, "running") for r in engine.scheduler.running]
    queues += [(r, "preempted" if r.num_preemptions else "waiting") for r in engine.scheduler.waiting]
    for request, state in queues:
        key = f"{request.request_id}#{request.index}"
        rows.append(
            {
                "id": request.request_id,
                "index": request.index,
                "state": state,
                "prompt_tokens": request.num_prompt_tokens,
                "computed_tokens": request.num_computed_tokens,
                "cached_tokens": request.num_cached_tokens,
                "output_tokens": len(request.output_token_ids),
                "blocks": len(engine.kv.block_tables.get(key, ())),
                "preemptions": request.num_preemptions,
                "age_s": round(now - request.arrival_time, 3),
                "ttft_s": round(request.first_token_time - request.arrival_time, 3)
                if request.first_token_time is not None
                else None,
            }
        )
    return rows
