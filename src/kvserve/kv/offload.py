"""TieredKVStore: the device block pool's lower tiers (host RAM, disk) and the copies between them.

    device pool --evicted--> host tier --evicted--> disk tier
        ^   |                                           ^
        |   +------ every newly cached block ------------+   (write-through, background)
        +---------- prefix hits loaded back --------------+

- Device -> host happens when the pool evicts a cached block (BlockPool calls on_evict before
  the block is handed to its new owner, so its content is still intact). On CUDA it is an
  asynchronous copy into pinned memory on the current stream, ordered before whatever writes
  the block next; on the CPU the "device" is RAM too and it is a memcpy.
- The disk tier is written through: each block the prefix cache registers is queued for the
  disk as soon as it is computed (flush(), once per engine step), so a restart, or a crash,
  keeps everything computed so far. The files are written on a background thread.
- A prefix lookup that misses the device continues block by block into host then disk
  (find()), and the hits are copied into freshly allocated device blocks before the request's
  prefill (load()), which counts them as cached tokens. A block that fails to load (a corrupt
  file) ends the hit there: the rest is computed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kvserve.kv.block_io import BlockIO
from kvserve.kv.events import KVEventLog
from kvserve.kv.tiers import DiskTier, HostTier, KVTier

logger = logging.getLogger(__name__)

# Write-through rows waiting for the disk thread are bounded: past this, new blocks skip the
# disk rather than grow memory without limit when the disk is slower than the engine.
MAX_PENDING_WRITE_BYTES = 256 * 2**20


@dataclass
class LowerTierHit:
    block_hash: bytes
    token_ids: tuple[int, ...]
    tier: KVTier


class TieredKVStore:
    def __init__(
        self,
        block_io: BlockIO,
        block_size: int,
        host_bytes: int | None = None,
        disk_dir: str | None = None,
        disk_bytes: int | None = None,
    ) -> None:
        self.io = block_io
        self.block_size = block_size
        self.on_cuda = block_io.device.type == "cuda"
        self.host = HostTier(host_bytes, block_io.row_nbytes, pin_memory=self.on_cuda) if host_bytes else None
        self.disk = DiskTier(disk_dir, disk_bytes, block_io.row_nbytes) if disk_dir else None
        if self.host is not None:
            self.host.next_tier = self.disk
        self.tiers: list[KVTier] = [t for t in (self.host, self.disk) if t is not None]
        self._write_through: list[tuple[bytes, tuple[int, ...], int]] = []  # (hash, tokens, device block id)
        self.num_skipped_writes = 0

    def attach_events(self, events: KVEventLog) -> None:
        """KV events from here on: every tier reports what it stores and drops; the disk tier first
        announces what it holds already (an earlier run's blocks)."""
        for tier in self.tiers:
            tier.events = events
        if self.disk is not None:
            self.disk.announce()

    # ------------------------------------------------------------------ lookups and loads

    def find(self, blocks: Iterable[tuple[bytes, tuple[int, ...]]]) -> list[LowerTierHit]:
        """The leading run of `blocks` (hash, token ids) that some lower tier holds, fastest tier first."""
        hits = []
        for block_hash, token_ids in blocks:
            tier = next((t for t in self.tiers if t.contains(block_hash, token_ids)), None)
            if tier is None:
                break
            hits.append(LowerTierHit(block_hash, token_ids, tier))
        return hits

    def load(self, hits: list[LowerTierHit], block_ids: list[int]) -> int:
        """Copies hits into the device blocks `block_ids` in order; returns how many loaded (a
        block that cannot be produced ends the run)."""
        rows = []
        for hit in hits:
            # the allocation that made room for these may have pushed the block down a tier since find()
            for tier in self.tiers[self.tiers.index(hit.tier) :]:
                row = tier.load(hit.block_hash, hit.token_ids)
                if row is not None:
                    break
            if row is None:
                break
            rows.append(row)
            tier.stats.hit_tokens += self.block_size
            tier.stats.bytes_out += self.io.row_nbytes
        if rows:
            staged = torch.empty(len(rows), self.io.row_nbytes, dtype=torch.uint8, device=self.io.device)
            for i, row in enumerate(rows):
                staged[i].copy_(row, non_blocking=True)  # from pinned host rows: asynchronous on CUDA
            self.io.scatter(block_ids[: len(rows)], staged)
        return len(rows)

    # ------------------------------------------------------------------ BlockPool observer

    def on_cached(self, block_hash: bytes, token_ids: tuple[int, ...], block_id: int) -> None:
        """A block was registered in the prefix cache (its KV is computed)."""
        if self.disk is not None:
            self._write_through.append((block_hash, token_ids, block_id))

    def on_evict(self, evicted: list[tuple[bytes, tuple[int, ...], int]]) -> None:
        """Cached blocks lost their hash and are about to be overwritten: save what is worth saving."""
        self.flush()  # queued write-through blocks may be among them
        if self.host is None or not evicted:
            return
        todo = []
        for block_hash, token_ids, block_id in evicted:
            if self.host.contains(block_hash, token_ids):
                self.host.load(block_hash, token_ids)  # already there: only refresh its LRU position
            else:
                todo.append((block_hash, token_ids, block_id))
        if todo:
            rows = self.io.gather([b for _, _, b in todo])
            for (block_hash, token_ids, _), row in zip(todo, rows):
                self.host.store(block_hash, token_ids, row)

    def flush(self) -> None:
        """Queues the newly cached blocks for the disk; called after each step's forward (their KV
        is written) and before any block is reused."""
        if not self._write_through:
            return
        todo = [(h, t, b) for h, t, b in self._write_through if not self.disk.has(h)]
        self._write_through = []
        budget = MAX_PENDING_WRITE_BYTES - self.disk.pending_bytes
        if len(todo) * self.io.row_nbytes > budget:
            keep = max(0, budget // self.io.row_nbytes)
            self.num_skipped_writes += len(todo) - keep
            todo = todo[:keep]
        if not todo:
            return
        rows = self.io.gather([b for _, _, b in todo])
        ready = None
        if self.on_cuda:
            host_rows = torch.empty(rows.shape, dtype=torch.uint8, pin_memory=True)
            host_rows.copy_(rows, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            rows = host_rows
        for (block_hash, token_ids, _), row in zip(todo, rows):
            self.disk.store(block_hash, token_ids, row, ready)

    def close(self) -> None:
        self.flush()
        for tier in self.tiers:
            tier.close()

    # ------------------------------------------------------------------ reporting

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            t.name: {**vars(t.stats), "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes}
            for t in self.tiers
        }

    def summary(self) -> str:
        """For the periodic engine log line."""
        return ", ".join(
            f"{t.name} tier hits {t.stats.hit_tokens} tokens, {100 * t.used_bytes / t.capacity_bytes:.0f}% "
            f"of {t.capacity_bytes / 2**20:.0f} MiB"
            for t in self.tiers
        )
