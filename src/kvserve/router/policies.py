"""Routing policies: which healthy worker gets a request, and why.

- round_robin: in turn.
- least_load: the fewest requests there now (Worker.load).
- prefix: the most leading blocks of the request already cached there (the KV index); no hit anywhere,
  or a tie, goes to the least loaded. SGLang's cache-aware router, with exact hashes instead of an
  approximate tree.
- cost (the default): NVIDIA Dynamo's KV router: cost = overlap_weight x the request's blocks that
  worker would have to compute + the blocks its requests in flight hold there; the cheapest wins.

prefix and cost give way to load when the load is out of balance: when the busiest worker has more
than `balance_abs` requests more than the idlest and more than `balance_rel` times as many, the
request goes to the idlest (reason "balance"). Without that, a hot prefix would pin all its traffic
on one worker while the other idles.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from kvserve.router.index import KVIndex
from kvserve.router.workers import Worker

POLICIES = ("round_robin", "least_load", "prefix", "cost")

# What computing one block of prompt costs against one block held by a request in flight. On the CPU a
# block of prefill is ~27 ms of a core (16 tokens at ~600 tokens/s), while a block in use adds its K/V reads
# to the decode steps of its request (~1 ms over a 32-token answer): ~27x. Measured (benchmarks/router.py,
# 64 MiB a worker): hit rate 57.7% at weight 1 (Dynamo's default, tuned for GPUs, where memory is what
# in-flight blocks cost), 75.9% at 4, 77.5% at 16.
DEFAULT_OVERLAP_WEIGHT = 16.0

# Requests more on the busiest worker than on the idlest past which load decides (with 1.5x as many). At 4,
# a busy machine's queues crossed it often enough to send tenants away from their cached prefixes (hit rate
# 67.0%, 6 of 68 decisions by balance); at 8, 81.5% (1 decision), with the requests still split 32 / 32
# (benchmarks/router.py, one window). SGLang's router defaults to 32.
DEFAULT_BALANCE_ABS = 8


@dataclass
class RoutedRequest:
    """What a policy knows of a request: its prefix-hash chain per root hash (workers of one model share one
    root; empty when the prompt could not be tokenized), its prompt's blocks and its whole KV footprint in
    blocks (prompt + max_tokens)."""

    hashes: dict[bytes, list[bytes]]
    num_prompt_blocks: int
    num_blocks: int

    def chain(self, worker: Worker) -> list[bytes]:
        return self.hashes.get(worker.root_hash, []) if worker.root_hash is not None else []


@dataclass
class Decision:
    worker: Worker
    reason: str
    predicted_cached_blocks: int = 0


def least_loaded(workers: list[Worker]) -> Worker:
    return min(workers, key=lambda w: (w.load, w.active_blocks))


class Policy:
    name = ""

    def __init__(
        self,
        index: KVIndex,
        balance_abs: int = DEFAULT_BALANCE_ABS,
        balance_rel: float = 1.5,
        overlap_weight: float = DEFAULT_OVERLAP_WEIGHT,
    ):
        self.index = index
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.overlap_weight = overlap_weight
        self._turn = itertools.count()

    def choose(self, workers: list[Worker], request: RoutedRequest) -> Decision:
        raise NotImplementedError

    def _unbalanced(self, workers: list[Worker]) -> bool:
        loads = [w.load for w in workers]
        return max(loads) - min(loads) > self.balance_abs and max(loads) > self.balance_rel * min(loads)

    def _matched(self, worker: Worker, request: RoutedRequest) -> int:
        return self.index.matched_blocks(worker.url, request.chain(worker))


class RoundRobin(Policy):
    name = "round_robin"

    def choose(self, workers: list[Worker], request: RoutedRequest) -> Decision:
        worker = workers[next(self._turn) % len(workers)]
        return Decision(worker, "round_robin", self._matched(worker, request))


class LeastLoad(Policy):
    name = "least_load"

    def choose(self, workers: list[Worker], request: RoutedRequest) -> Decision:
        worker = least_loaded(workers)
        return Decision(worker, "least_load", self._matched(worker, request))


class KVAware(Policy):
    """prefix and cost: the KV index decides, unless the load is out of balance."""

    def choose(self, workers: list[Worker], request: RoutedRequest) -> Decision:
        if self._unbalanced(workers):
            worker = least_loaded(workers)
            return Decision(worker, "balance", self._matched(worker, request))
        return self.by_cache(workers, request, {w: self._matched(w, request) for w in workers})

    def by_cache(self, workers: list[Worker], request: RoutedRequest, matched: dict[Worker, int]) -> Decision:
        raise NotImplementedError


class PrefixAware(KVAware):
    name = "prefix"

    def by_cache(self, workers: list[Worker], request: RoutedRequest, matched: dict[Worker, int]) -> Decision:
        best = max(matched.values())
        if best == 0:
            return Decision(least_loaded(workers), "no_prefix_hit")
        worker = least_loaded([w for w in workers if matched[w] == best])
        return Decision(worker, "prefix_hit", best)


class CostAware(KVAware):
    name = "cost"

    def by_cache(self, workers: list[Worker], request: RoutedRequest, matched: dict[Worker, int]) -> Decision:
        def cost(w: Worker) -> tuple[float, int]:
            to_compute = request.num_prompt_blocks - matched[w]
            return self.overlap_weight * to_compute + w.active_blocks, w.load

        worker = min(workers, key=cost)
        return Decision(worker, "cost_prefix_hit" if matched[worker] else "cost", matched[worker])


def make_policy(name: str, index: KVIndex, **knobs) -> Policy:
    classes = {c.name: c for c in (RoundRobin, LeastLoad, PrefixAware, CostAware)}
    if name not in classes:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return classes[name](index, **knobs)
