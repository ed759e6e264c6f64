"""Stable block hashes for the prefix cache.

hash(block k) = sha256(hash(block k-1) || the block's token ids as little-endian int32)
with hash(block -1) = sha256(extra keys: model fingerprint, KV dtype, block size).

sha256 rather than Python's `hash`, which is salted per process: these hashes
name blocks across processes and restarts (the disk tier is keyed by them).
"""

from __future__ import annotations

import hashlib
import struct
from array import array


def root_hash(*extra_keys: str) -> bytes:
    """The chain's seed: everything besides token ids that decides a block's K/V."""
    h = hashlib.sha256(b"kvserve-prefix-v1")
    for key in extra_keys:
        encoded = key.encode()
        h.update(struct.pack("<I", len(encoded)))
        h.update(encoded)
    return h.digest()


def block_hash(parent: bytes, token_ids: tuple[int, ...] | list[int]) -> bytes:
    return hashlib.sha256(parent + array("i", token_ids).tobytes()).digest()


def extend_block_hashes(hashes: list[bytes], root: bytes, token_ids_of, num_tokens: int, block_size: int) -> None:
    """Appends the hashes of every full block not hashed yet, in place (incremental as tokens grow).
    `token_ids_of(start, end)` returns the request's token ids in [start, end)."""
    for index in range(len(hashes), num_tokens // block_size):
        parent = hashes[-1] if hashes else root
        hashes.append(block_hash(parent, token_ids_of(index * block_size, (index + 1) * block_size)))
