"""BlockPool: fixed-size KV blocks with reference counts, a prefix cache and an LRU free queue.

Every block is in exactly one of three states:
    in use        ref_count > 0, not in the free queue
    cached free   ref_count == 0, in the free queue, block_hash set (a later prefix hit can revive it)
    plain free    ref_count == 0, in the free queue, block_hash None

The free queue is also the eviction order: allocation takes from its head, and
a cached block taken from there loses its hash (it is evicted). Freed blocks go
to the tail, so the least recently used cached block is evicted first. The
queue is a doubly linked list threaded through the Block objects themselves,
so taking a revived block out of the middle is O(1) and no Python object is
created per block operation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from kvserve.kv.events import MEDIUM_DEVICE, KVEventLog


@dataclass(eq=False, slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None  # kept with the hash: a hit compares tokens, so collisions are harmless
    parent_hash: bytes | None = None  # the hash of the block before it in its sequence (the prefix tree's edge)
    hits: int = 0  # prefix-cache hits on this content since it was cached (the dashboard's counts)
    prev_free: Block | None = None
    next_free: Block | None = None


class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinel head/tail; O(1) push, pop and remove."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def popleft(self) -> Block:
        block = self._head.next_free
        if block is self._tail:
            raise RuntimeError("no free KV blocks")
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def __iter__(self):
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free


class BlockObserver(Protocol):
    """Told about the prefix cache's content (kv/offload.py keeps the lower tiers with it)."""

    def on_cached(self, block_hash: bytes, token_ids: tuple[int, ...], block_id: int) -> None: ...

    def on_evict(self, evicted: list[tuple[bytes, tuple[int, ...], int]]) -> None:
        """(hash, token ids, block id) of blocks that just lost their hash, called before anything
        can write into them: their KV is still intact."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}  # block hash -> block holding that content
        self.num_evictions = 0
        self.observer: BlockObserver | None = None
        self.events: KVEventLog | None = None  # KV events (kv/events.py): blocks cached and evicted here

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: plain free plus cached-but-evictable."""
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, count: int) -> list[Block]:
        if count > self.free_queue.num_free:
            raise RuntimeError(f"asked for {count} KV blocks, {self.free_queue.num_free} free")
        out = []
        evicted = []
        for _ in range(count):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                evicted.append((block.block_hash, block.token_ids, block.block_id))
            self._evict(block)
            block.ref_count = 1
            out.append(block)
        self._report_evictions(evicted)
        return out

    def _report_evictions(self, evicted: list[tuple[bytes, tuple[int, ...], int]]) -> None:
        if not evicted:
            return
        if self.events is not None:
            self.events.removed([block_hash for block_hash, _, _ in evicted], MEDIUM_DEVICE)
        if self.observer is not None:  # a block queued by on_cached and since freed comes back here first
            self.observer.on_evict(evicted)

    def lookup(self, block_hash: bytes, token_ids: tuple[int, ...]) -> Block | None:
        """The cached block with this content, or None. Token ids are compared, so a hash collision is a miss."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def touch(self, blocks: Iterable[Block]) -> None:
        """Takes a reference on prefix-cache hits, reviving those that sat in the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1
            block.hits += 1

    def share(self, blocks: Iterable[Block]) -> None:
        """Another sequence takes a reference on in-use blocks (parallel sampling)."""
        for block in blocks:
            assert block.ref_count > 0
            block.ref_count += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drops one reference each. Callers pass a request's blocks tail first, so that a prompt's
        tail blocks reach the free queue ahead of its head and are evicted first."""
        for block in blocks:
            assert block.ref_count > 0, f"double free of block {block.block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue.append(block)

    def cache_block(
        self, block: Block, block_hash: bytes, token_ids: tuple[int, ...], parent_hash: bytes | None = None
    ) -> None:
        """Registers a full, computed block under its hash (`parent_hash`: the block before it in its
        sequence, None for the first; only KV events use it). An existing entry for the same content
        wins: two requests that computed the same block in the same step keep one cached copy."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        block.token_ids = token_ids
        block.parent_hash = parent_hash
        self.cached[block_hash] = block
        if self.events is not None:
            self.events.stored(block_hash, parent_hash, token_ids, MEDIUM_DEVICE)
        if self.observer is not None:
            self.observer.on_cached(block_hash, token_ids, block.block_id)

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None
            block.parent_hash = None
            block.hits = 0
            self.num_evictions += 1

    def reset_prefix_cache(self) -> None:
        """Forgets every evictable cached block (lower tiers, if any, receive them as evictions)."""
        evicted = []
        for block in self.blocks:
            if block.ref_count == 0:
                if block.block_hash is not None:
                    evicted.append((block.block_hash, block.token_ids, block.block_id))
                self._evict(block)
        self._report_evictions(evicted)

    def check_idle(self) -> None:
        """The idle invariant: every block free (plain or cached) and no reference held."""
        leaked = [b.block_id for b in self.blocks if b.ref_count != 0]
        assert not leaked, f"KV blocks still referenced while idle: {leaked[:10]}"
        assert self.free_queue.num_free == self.num_blocks, "free queue lost blocks"
