"""KVCacheManager: per-request block tables on top of the BlockPool, with prefix-cache lookups.

A request's block table lists its blocks in token order: token at position p
lives in slot (table[p // block_size].block_id * block_size + p % block_size).
Invariant: len(table) == ceil(tokens with allocated slots / block_size).

A quantized cache keeps the K and V of each request's last two blocks in a
16-bit window besides their codes (kv/quant.py); the manager gives every
request that holds blocks one such window ("open slot"), from a fixed set,
notes the first position the request wrote into it, and takes it back when
the request's blocks are freed.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.kv.block_pool import Block, BlockPool
from kvserve.kv.offload import LowerTierHit, TieredKVStore
from kvserve.kv.prefix_hash import extend_block_hashes
from kvserve.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up at admission
    hits: int = 0  # of those, tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        root_hash: bytes,
        num_open_slots: int = 0,
    ) -> None:
        self.block_size = block_size
        self.num_open_slots = num_open_slots  # 0: the cache needs none
        self.free_open_slots = list(range(num_open_slots - 1, -1, -1))  # popped from the end: 0 first
        self.open_slots: dict[str, int] = {}  # a quantized cache's window slot per running sequence
        self.window_starts: dict[str, int] = {}  # the first position each wrote into its window slot
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = root_hash
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.block_tables: dict[str, list[Block]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # how many of a request's leading blocks are registered
        self.stats = PrefixCacheStats()
        self.offload: TieredKVStore | None = None

    def attach_offload(self, store: TieredKVStore) -> None:
        """Adds lower tiers (host RAM, disk) below the pool; they need the prefix cache's hashes."""
        assert self.enable_prefix_caching, "KV offload tiers need prefix caching"
        self.offload = store
        self.pool.observer = store

    def _key(self, request: Request) -> str:
        return f"{request.request_id}#{request.index}"

    def open_slot(self, request: Request) -> int:
        return self.open_slots[self._key(request)]

    def window_start(self, request: Request, position: int) -> int:
        """The first position `request` wrote into its window slot: `position` if this is its first
        write since it took the slot (kv/quant.py window_first_block)."""
        return self.window_starts.setdefault(self._key(request), position)

    def _take_open_slot(self, key: str) -> bool:
        """Gives `key` an open slot if the cache uses them and it has none; False if none is free."""
        if not self.num_open_slots or key in self.open_slots:
            return True
        if not self.free_open_slots:
            return False
        self.open_slots[key] = self.free_open_slots.pop()
        return True

    def block_ids(self, request: Request) -> list[int]:
        return [b.block_id for b in self.block_tables[self._key(request)]]

    def update_hashes(self, request: Request) -> None:
        if self.enable_prefix_caching:
            extend_block_hashes(
                request.block_hashes, self.root_hash, request.tokens, request.num_tokens, self.block_size
            )

    def get_computed_blocks(self, request: Request) -> list[Block]:
        """The longest cached prefix of the request's tokens, in whole blocks, stopping at least one
        token short of the end so the last token is computed and yields logits."""
        if not self.enable_prefix_caching or request.params.needs_every_position:
            return []  # prompt logprobs and embeddings need every prompt position computed
        self.update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        bs = self.block_size
        for index, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.lookup(block_hash, tuple(request.tokens(index * bs, (index + 1) * bs)))
            if block is None:
                break
            hits.append(block)
        return hits

    def get_lower_tier_hits(self, request: Request, num_device_hits: int) -> list[LowerTierHit]:
        """The blocks after the device hits that a lower tier holds (a leading run), with the same
        one-token-short limit. They are loaded by load_lower_tier_hits once slots are allocated."""
        if self.offload is None or request.params.needs_every_position:
            return []
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        return self.offload.find(
            (request.block_hashes[i], tuple(request.tokens(i * bs, (i + 1) * bs)))
            for i in range(num_device_hits, max_blocks)
        )

    def load_lower_tier_hits(self, request: Request, num_device_hits: int, hits: list[LowerTierHit]) -> int:
        """Copies lower-tier hits into the request's blocks that follow its device hits (allocated
        by allocate_slots as new tokens); returns how many blocks loaded. The prefix cache registers
        them after the step, like computed blocks."""
        if not hits:
            return 0
        table = self.block_tables[self._key(request)]
        block_ids = [b.block_id for b in table[num_device_hits : num_device_hits + len(hits)]]
        return self.offload.load(hits, block_ids)

    def flush_offload(self) -> None:
        """After a step's forward: newly computed blocks start their way to the disk tier."""
        if self.offload is not None:
            self.offload.flush()

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[Block] = ()) -> bool:
        """Makes room for `num_new_tokens` more tokens after the computed ones (and after
        `computed_blocks`, prefix hits of a request being admitted). False if the pool is short;
        then nothing changes."""
        key = self._key(request)
        table = self.block_tables.get(key, [])
        total_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        needed = -(-total_tokens // self.block_size) - len(table) - len(computed_blocks)
        # hits sitting in the free queue stop being allocatable once taken
        revived = sum(1 for b in computed_blocks if b.ref_count == 0)
        if needed > self.pool.num_free_blocks - revived or not self._take_open_slot(key):
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            table.extend(computed_blocks)
            self.num_cached_blocks[key] = len(table)
        if needed > 0:
            table.extend(self.pool.allocate(needed))
        self.block_tables[key] = table
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Registers the request's full, computed blocks in the prefix cache (prompt and output alike,
        so a conversation's next turn reuses this turn's answer)."""
        if not self.enable_prefix_caching:
            return
        key = self._key(request)
        num_full = request.num_computed_tokens // self.block_size
        start = self.num_cached_blocks.get(key, 0)
        if num_full <= start:
            return
        self.update_hashes(request)
        table = self.block_tables[key]
        bs = self.block_size
        hashes = request.block_hashes
        for index in range(start, num_full):
            tokens = tuple(request.tokens(index * bs, (index + 1) * bs))
            self.pool.cache_block(table[index], hashes[index], tokens, hashes[index - 1] if index else None)
        self.num_cached_blocks[key] = num_full

    def fork(self, parent: Request, child: Request) -> tuple[int, int] | None:
        """Gives `child` the parent's prompt KV: full blocks shared by reference, the partial last
        block copied. Returns (src, dst) block ids to copy, or None if nothing to copy.
        Raises RuntimeError if no block is free for the copy, or no open-block slot for the child
        (the caller falls back to recompute)."""
        parent_table = self.block_tables[self._key(parent)]
        num_full = parent.num_prompt_tokens // self.block_size
        has_partial = parent.num_prompt_tokens % self.block_size != 0
        if has_partial and self.pool.num_free_blocks < 1:
            raise RuntimeError("no free block to fork into")
        if not self._take_open_slot(self._key(child)):
            raise RuntimeError("no free open-block slot to fork into")
        shared = parent_table[:num_full]
        self.pool.share(shared)
        table = list(shared)
        copy = None
        if has_partial:
            (block,) = self.pool.allocate(1)
            table.append(block)
            copy = (parent_table[num_full].block_id, block.block_id)
        key = self._key(child)
        if (start := self.window_starts.get(self._key(parent))) is not None:
            self.window_starts[key] = start  # the caller copies the parent's window into the child's
        self.block_tables[key] = table
        self.num_cached_blocks[key] = min(num_full, self.num_cached_blocks.get(self._key(parent), 0))
        return copy

    def free(self, request: Request) -> None:
        key = self._key(request)
        table = self.block_tables.pop(key, None)
        self.num_cached_blocks.pop(key, None)
        self.window_starts.pop(key, None)
        slot = self.open_slots.pop(key, None)
        if slot is not None:
            self.free_open_slots.append(slot)
        if table:
            self.pool.free(reversed(table))  # tail first: evicted before the shared head

    def record_admission(self, request: Request, num_hit_tokens: int) -> None:
        self.stats.queries += request.num_tokens
        self.stats.hits += num_hit_tokens
