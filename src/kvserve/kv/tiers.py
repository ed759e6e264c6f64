"""The prefix cache's lower tiers: host RAM and local disk, below the device block pool.

Both store block rows (kv/block_io.py: one block of every layer as flat bytes) under the
block's hash, are bounded, and evict least recently used first. The host tier is a
preallocated row pool (pinned on CUDA, so copies to and from the GPU run asynchronously);
the disk tier is one file per block, named by its hash, so it is content-addressed: a
restarted server, or a second one on the same directory, finds blocks computed earlier.
The hash chain includes the model fingerprint, dtype, KV dtype and block size, so a block
can only ever be found by a cache it fits.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from abc import ABC, abstractmethod
from array import array
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvserve.kv.events import KVEventLog

logger = logging.getLogger(__name__)


@dataclass
class TierStats:
    hit_tokens: int = 0  # prefix-cache tokens served from this tier
    bytes_in: int = 0  # bytes copied into this tier
    bytes_out: int = 0  # bytes loaded from this tier back into device blocks
    evictions: int = 0
    corrupt: int = 0  # blocks that failed their checksum (disk): dropped, served as misses


class KVTier(ABC):
    """One lower tier. Contract:
    - contains() is cheap (an in-memory index, at most one stat() on the disk) and may say yes
      to a block that load() then cannot produce (a corrupt file): callers treat that as a miss.
    - load() returns the row exactly as stored, or None; never another block's row (the token
      ids are compared, so even a hash collision is a miss).
    - store() keeps its own copy of the row (the caller may reuse the row's memory once any
      `ready` event has completed), never grows the tier past capacity_bytes, and evicts least
      recently used blocks, handing them to `next_tier` if there is one and it lacks them.
    """

    name: str  # also the medium of its KV events
    next_tier: KVTier | None = None
    events: KVEventLog | None = None  # KV events (kv/events.py): blocks stored here and dropped from here

    def __init__(self) -> None:
        self.stats = TierStats()

    def _stored(self, block_hash: bytes, token_ids: tuple[int, ...]) -> None:
        if self.events is not None:  # a lower tier does not know a block's parent
            self.events.stored(block_hash, None, token_ids, self.name)

    def _removed(self, block_hashes: list[bytes]) -> None:
        if self.events is not None:
            self.events.removed(block_hashes, self.name)

    @abstractmethod
    def contains(self, block_hash: bytes, token_ids: tuple[int, ...]) -> bool: ...

    @abstractmethod
    def load(self, block_hash: bytes, token_ids: tuple[int, ...]) -> torch.Tensor | None: ...

    @abstractmethod
    def store(self, block_hash: bytes, token_ids: tuple[int, ...], row: torch.Tensor, ready=None) -> None: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @abstractmethod
    def block_hashes(self) -> list[bytes]:
        """The hashes of every block held now."""

    def close(self) -> None:  # noqa: B027 - optional hook, most tiers have nothing to wait for
        """Waits for background work (pending writes)."""


class HostTier(KVTier):
    """Host RAM: a [num_slots, row_nbytes] uint8 pool, an LRU index hash -> (slot, token ids)."""

    name = "host"

    def __init__(self, capacity_bytes: int, row_nbytes: int, pin_memory: bool) -> None:
        super().__init__()
        num_slots = capacity_bytes // row_nbytes
        if num_slots < 1:
            raise ValueError(f"kv_offload_memory {capacity_bytes} B holds no KV block ({row_nbytes} B per block)")
        self.row_nbytes = row_nbytes
        self.rows = torch.empty(num_slots, row_nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        self.index: OrderedDict[bytes, tuple[int, tuple[int, ...]]] = OrderedDict()
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self._last_copy: torch.cuda.Event | None = None  # the newest device -> host copy (CUDA)

    @property
    def used_bytes(self) -> int:
        return len(self.index) * self.row_nbytes

    @property
    def capacity_bytes(self) -> int:
        return self.rows.shape[0] * self.row_nbytes

    def block_hashes(self) -> list[bytes]:
        return list(self.index)

    def contains(self, block_hash: bytes, token_ids: tuple[int, ...]) -> bool:
        entry = self.index.get(block_hash)
        return entry is not None and entry[1] == token_ids

    def load(self, block_hash: bytes, token_ids: tuple[int, ...]) -> torch.Tensor | None:
        """A view of the stored row: copies from it to the GPU are ordered after the copy that filled it."""
        if not self.contains(block_hash, token_ids):
            return None
        self.index.move_to_end(block_hash)
        return self.rows[self.index[block_hash][0]]

    def store(self, block_hash: bytes, token_ids: tuple[int, ...], row: torch.Tensor, ready=None) -> None:
        if block_hash in self.index:
            self.index.move_to_end(block_hash)
            return
        if not self.free_slots:
            old_hash, (slot, old_tokens) = self.index.popitem(last=False)
            self.stats.evictions += 1
            self._removed([old_hash])
            if self.next_tier is not None and not self.next_tier.contains(old_hash, old_tokens):
                self._wait_copies()  # the CPU reads the row: its device -> host copy must be done
                self.next_tier.store(old_hash, old_tokens, self.rows[slot].clone())
            self.free_slots.append(slot)
        slot = self.free_slots.pop()
        self.rows[slot].copy_(row, non_blocking=True)  # from the GPU: asynchronous into pinned memory
        if row.is_cuda:
            self._last_copy = torch.cuda.Event()
            self._last_copy.record()
        self.index[block_hash] = (slot, token_ids)
        self.stats.bytes_in += self.row_nbytes
        self._stored(block_hash, token_ids)

    def _wait_copies(self) -> None:
        if self._last_copy is not None:
            self._last_copy.synchronize()
            self._last_copy = None


# A disk block file: header, the block's token ids (int32), the row. The crc32 covers tokens and row.
_MAGIC = b"KVSBLK01"
_HEADER = struct.Struct("<8s32sIQI")  # magic, block hash, number of tokens, row bytes, crc32
_STALE_TMP_SECONDS = 600


@dataclass
class _PendingWrite:
    token_ids: tuple[int, ...]
    row: torch.Tensor
    ready: torch.cuda.Event | None


class DiskTier(KVTier):
    """Local disk: <dir>/<hh>/<hash hex>.kvb, written in the background (temp file + rename, so a
    reader never sees half a file), verified by crc32 on every load, LRU by last use (file mtime
    across restarts). A block queued for writing is served from memory until its file exists.

    A write that fails (the folder became unwritable, the disk is full) turns the tier off for the
    rest of the run, with one warning: it then holds nothing and finds nothing, and the engine
    computes what it would have loaded. Serving goes on; one failed write per block, each warned, on a
    full disk would slow every step for nothing."""

    name = "disk"

    def __init__(self, directory: str, capacity_bytes: int, row_nbytes: int) -> None:
        super().__init__()
        self.directory = directory
        self.row_nbytes = row_nbytes
        self._capacity = capacity_bytes
        self._used = 0
        self.index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, least recently used first
        self._pending: dict[bytes, _PendingWrite] = {}
        self._lock = threading.Lock()  # index, _used and _pending are shared with the writer thread
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvserve-disk-tier")  # one thread: FIFO order
        self.off_reason: str | None = None  # why the tier turned itself off, once it has
        os.makedirs(directory, exist_ok=True)
        self._scan()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def pending_bytes(self) -> int:
        """Rows queued for the writer thread (held in memory until written)."""
        return len(self._pending) * self.row_nbytes

    def path(self, block_hash: bytes) -> str:
        name = block_hash.hex()
        return os.path.join(self.directory, name[:2], name + ".kvb")

    def _scan(self) -> None:
        """Indexes the files an earlier process left, oldest use first, and enforces the size limit."""
        found = []
        now = time.time()
        for sub in os.scandir(self.directory):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub.path):
                stat = entry.stat()
                if entry.name.endswith(".tmp"):  # a write that never finished
                    if now - stat.st_mtime > _STALE_TMP_SECONDS:
                        _remove(entry.path)
                    continue
                if not entry.name.endswith(".kvb"):
                    continue
                try:
                    block_hash = bytes.fromhex(entry.name[:-4])
                except ValueError:
                    continue
                found.append((stat.st_mtime, block_hash, stat.st_size))
        for _, block_hash, size in sorted(found):
            self.index[block_hash] = size
            self._used += size
        with self._lock:
            self._evict_down_to(self._capacity)
        if found:
            logger.info(
                "disk KV tier %s: %d blocks, %.1f MiB from earlier runs", self.directory, len(found), self._used / 2**20
            )

    def contains(self, block_hash: bytes, token_ids: tuple[int, ...]) -> bool:
        if self.off_reason is not None:
            return False
        with self._lock:
            pending = self._pending.get(block_hash)
            if pending is not None:
                return pending.token_ids == token_ids
            if block_hash in self.index:
                return True
        try:  # another process on the same directory may have written it since our scan
            size = os.stat(self.path(block_hash)).st_size
        except OSError:
            return False
        with self._lock:
            new = block_hash not in self.index
            if new:
                self.index[block_hash] = size
                self._used += size
                self._evict_down_to(self._capacity)
            found = block_hash in self.index
        if new and found:
            self._stored(block_hash, token_ids)
        return found

    def block_hashes(self) -> list[bytes]:
        with self._lock:
            return list(self.index)

    def has(self, block_hash: bytes) -> bool:
        """In the index or queued (no file-system access)."""
        if self.off_reason is not None:
            return False
        with self._lock:
            return block_hash in self.index or block_hash in self._pending

    def load(self, block_hash: bytes, token_ids: tuple[int, ...]) -> torch.Tensor | None:
        if self.off_reason is not None:
            return None
        with self._lock:
            pending = self._pending.get(block_hash)
        if pending is not None:
            if pending.token_ids != token_ids:
                return None
            if pending.ready is not None:
                pending.ready.synchronize()
            return pending.row
        path = self.path(block_hash)
        try:
            with open(path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
        except OSError:
            self._forget(block_hash)
            return None
        problem = self._check(data, block_hash)
        if problem is not None:
            logger.warning("disk KV block %s is unusable (%s): treated as a miss and removed", path, problem)
            self.stats.corrupt += 1
            self._forget(block_hash)
            _remove(path)  # now, so that contains() cannot find it again
            return None
        num_tokens = _HEADER.unpack_from(data)[2]
        stored_tokens = tuple(array("i", bytes(data[_HEADER.size : _HEADER.size + 4 * num_tokens])))
        if stored_tokens != token_ids:
            return None  # a hash collision: another block's content, not ours
        with self._lock:
            if block_hash in self.index:
                self.index.move_to_end(block_hash)
        try:
            os.utime(path)  # the last use survives a restart
        except OSError:
            pass
        return torch.frombuffer(data, dtype=torch.uint8, offset=_HEADER.size + 4 * num_tokens, count=self.row_nbytes)

    def _check(self, data: bytearray, block_hash: bytes) -> str | None:
        """Why a file's bytes cannot be served, or None if they can."""
        if len(data) < _HEADER.size:
            return f"truncated: {len(data)} bytes"
        magic, stored_hash, num_tokens, row_nbytes, crc = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            return "not a kvserve block file"
        if stored_hash != block_hash:
            return "stored under another block's name"
        if row_nbytes != self.row_nbytes:
            return f"row of {row_nbytes} bytes, expected {self.row_nbytes}"
        expected = _HEADER.size + 4 * num_tokens + row_nbytes
        if len(data) != expected:
            return f"{len(data)} bytes, expected {expected}"
        if zlib.crc32(memoryview(data)[_HEADER.size :]) != crc:
            return "checksum mismatch"
        return None

    def store(self, block_hash: bytes, token_ids: tuple[int, ...], row: torch.Tensor, ready=None) -> None:
        size = _HEADER.size + 4 * len(token_ids) + self.row_nbytes
        if size > self._capacity or self.off_reason is not None:
            return
        with self._lock:
            if block_hash in self._pending:
                return
            if block_hash in self.index:
                self.index.move_to_end(block_hash)
                return
            self._evict_down_to(self._capacity - size)
            self.index[block_hash] = size
            self._used += size
            self._pending[block_hash] = _PendingWrite(token_ids, row, ready)
        self.stats.bytes_in += self.row_nbytes
        self._stored(block_hash, token_ids)  # findable from now on (from memory until its file exists)
        self._writer.submit(self._write, block_hash)

    def _evict_down_to(self, limit: int) -> None:
        """Drops least recently used blocks until at most `limit` bytes are used (lock held)."""
        while self._used > limit and self.index:
            block_hash, size = self.index.popitem(last=False)
            self._used -= size
            self.stats.evictions += 1
            self._pending.pop(block_hash, None)  # a write still queued is skipped
            self._removed([block_hash])
            self._writer.submit(_remove, self.path(block_hash))  # runs after any write of it in progress (FIFO)

    def _forget(self, block_hash: bytes) -> None:
        with self._lock:
            self._forget_locked(block_hash)

    def _write(self, block_hash: bytes) -> None:
        """Writer thread: one block file, atomically."""
        with self._lock:
            pending = self._pending.get(block_hash)
        if pending is None:
            return  # evicted before its turn
        if pending.ready is not None:
            pending.ready.synchronize()  # its device -> host copy
        path = self.path(block_hash)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        tokens = array("i", pending.token_ids).tobytes()
        row = pending.row.numpy()
        crc = zlib.crc32(row, zlib.crc32(tokens))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, block_hash, len(pending.token_ids), self.row_nbytes, crc))
                f.write(tokens)
                f.write(row)
            os.replace(tmp, path)
        except OSError as exc:
            _remove(tmp)
            self._turn_off(f"could not write {path}: {exc}")
            return
        with self._lock:
            if self._pending.get(block_hash) is pending:
                del self._pending[block_hash]

    def _turn_off(self, reason: str) -> None:
        """Writer thread: the tier holds and finds nothing from now on (see the class docstring)."""
        with self._lock:
            if self.off_reason is not None:
                return
            self.off_reason = reason
            self._pending.clear()
            self._removed(list(self.index))
            self.index.clear()
            self._used = 0
        logger.warning(
            "disk KV tier %s turned off for this run (%s); serving goes on without it", self.directory, reason
        )

    def _forget_locked(self, block_hash: bytes) -> None:
        size = self.index.pop(block_hash, None)
        if size is not None:
            self._used -= size
            self._removed([block_hash])

    def stored_token_ids(self, block_hash: bytes) -> tuple[int, ...] | None:
        """The token ids a block file holds (its header only), or None if it cannot be read."""
        try:
            with open(self.path(block_hash), "rb") as f:
                header = f.read(_HEADER.size)
                if len(header) != _HEADER.size or header[:8] != _MAGIC:
                    return None
                num_tokens = _HEADER.unpack(header)[2]
                return tuple(array("i", f.read(4 * num_tokens)))
        except OSError:
            return None

    def announce(self) -> None:
        """Reports every block held (those an earlier run left included) as stored: called once when
        KV events start, so that a consumer knows what this tier holds from the start."""
        with self._lock:
            held = list(self.index)  # queued writes included
        for block_hash in held:
            pending = self._pending.get(block_hash)
            tokens = pending.token_ids if pending is not None else self.stored_token_ids(block_hash)
            if tokens is not None:
                self._stored(block_hash, tokens)

    def close(self) -> None:
        self._writer.shutdown(wait=True)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
