"""Scheduler: one token budget per step, decodes and chunked prefill mixed, FCFS, preemption.

Each step:
 1. Running requests, oldest first, each get the tokens they still need (1 for a
    decode, the rest of the prompt for a prefill), cut to the remaining budget:
    that cut is chunked prefill. If the pool has no block for one, the newest
    running request is preempted (blocks freed, full ones staying in the prefix
    cache) until it fits, or the request itself is the newest and is preempted.
 2. If nothing was preempted, waiting requests are admitted in arrival order
    while budget, max_num_seqs and blocks allow; a request's cached prefix
    costs no budget. Admission stops at the first that does not fit (FCFS).
A preempted request goes back to the front of the queue and is recomputed from
its tokens (prompt + output so far), so greedy output does not change.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvserve.config import EngineConfig
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens this step)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled

    def scheduled_requests(self) -> list[Request]:
        return [r for r, _ in self.scheduled]


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_chunked_prefills = 0  # steps in which a prefill was cut short by the budget

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[int] = set()

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new > 0, "a running request always has a token to compute"
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()  # newest
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.scheduled.append((request, num_new))
                scheduled_ids.add(id(request))
                budget -= num_new
                if num_new < request.num_tokens - request.num_computed_tokens:
                    self.num_chunked_prefills += 1
                index += 1
                continue
            break  # the request preempted itself: everything after it is gone too

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                request = self.waiting[0]
                fresh = request.num_computed_tokens == 0
                hits = self.kv.get_computed_blocks(request) if fresh else []
                lower = self.kv.get_lower_tier_hits(request, len(hits)) if fresh else []
                bs = self.kv.block_size
                remaining = request.num_tokens - request.num_computed_tokens - (len(hits) + len(lower)) * bs
                num_new = min(remaining, budget)
                # lower-tier hits need fresh device blocks to load into: allocated as if new tokens
                if not self.kv.allocate_slots(request, num_new + len(lower) * bs, hits):
                    break
                self.waiting.popleft()
                num_loaded = self.kv.load_lower_tier_hits(request, len(hits), lower)
                # a block that failed to load ends the hit: the rest is computed, in this step's
                # chunk (num_new tokens from the new start; its slots are already allocated) and later ones
                num_hit_tokens = (len(hits) + num_loaded) * bs
                self.kv.record_admission(request, num_hit_tokens)
                if request.num_preemptions == 0:
                    request.num_cached_tokens = num_hit_tokens  # what the user is told: first admission
                request.num_computed_tokens += num_hit_tokens
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                out.scheduled.append((request, num_new))
                budget -= num_new
                if num_new < remaining:
                    self.num_chunked_prefills += 1
        return out

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.cache_computed_blocks(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)
        out.scheduled = [(r, n) for r, n in out.scheduled if r is not request]

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Removes a request (finished or aborted) wherever it is and frees its blocks."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)

    def add_running(self, request: Request) -> None:
        """A forked parallel sample joins the running set directly (its KV is already in place)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)
