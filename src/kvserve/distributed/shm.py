"""Collectives between the tensor-parallel ranks of one machine, through shared memory.

gloo's all-reduce goes through loopback TCP: on this project's 2-core VMs it costs 0.8-2 ms even for
one token's 576 floats, and a step runs 61 of them (2 per layer + the embedding), which made a TP=2
decode step 6x slower than TP=1 (benchmarks/tensor_parallel.py). Like vLLM's CPU backend, ranks on one
machine exchange through one shared mapping instead:

    flags   [N] int64          the sequence number of the last exchange each rank published
    acks    [N] int64          the last command each rank read (rank 0 waits for all before the next)
    command [3 + capacity]     seq, op, length, then the int64 payload (rank 0 writes, the others read)
    slots   [2][N][SLOT_BYTES] each rank's part of an exchange; two buffers, alternating

An exchange: a rank copies its part into its slot of buffer (seq % 2), then stores seq in its flag,
then waits until every flag reaches seq and reads the others' slots. The all-reduce sums the slots
in rank order on every rank, so every rank gets the same bits (the residual stream must stay
identical across ranks). Two buffers suffice: a rank can only write buffer b again at seq + 2 after
every rank published seq + 1, which each did after it finished reading seq. Larger tensors go in
slot-sized chunks, one exchange each.

Ordering: a part's bytes are stored before its flag, and a flag is loaded before the slots it
guards, each in its own call; x86's total store order keeps stores and loads in program order, so
a rank that sees a flag sees the bytes. This module is used on x86-64 only (group.py checks).

Waiting spins for a while (a rank each core: the other rank is a few microseconds away), then yields,
then sleeps in short naps (a worker idles here while the server has nothing to do). A wait calls
`watch` every WATCH_SECONDS (rank 0: have its spawned ranks exited?), and a collective that waits
longer than `timeout` raises RankFailed: a rank that died cannot answer.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

SLOT_BYTES = 2 << 20  # one rank's part of one exchange; bigger tensors go in chunks
COMMAND_CAPACITY = 1 << 18  # int64s of a command's payload kept in the mapping (2 MiB); past it: gloo
SPIN_SECONDS = 0.002  # busy-wait this long before yielding the core
YIELD_SECONDS = 0.05  # then yield (sched_yield) this long before napping
NAP_SECONDS = 0.0005
IDLE_NAP_SECONDS = 0.005  # past IDLE_SECONDS of waiting (a worker while the server idles)
IDLE_SECONDS = 1.0
WATCH_SECONDS = 0.2


def _header_ints(world_size: int) -> int:
    return 2 * world_size + 3 + COMMAND_CAPACITY


class RankGone(RuntimeError):
    """A wait ended without the other ranks: `watch` saw one exit, or the timeout passed."""


class SharedMemoryChannel:
    def __init__(self, path: str, rank: int, world_size: int, create: bool) -> None:
        self.rank, self.world_size = rank, world_size
        header = _header_ints(world_size)
        self._slots_at = header * 8
        size = self.size_for(world_size)
        if create:
            with open(path, "wb") as f:
                f.truncate(size)
        self.memory = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        ints = self.memory[: header * 8].view(torch.int64)
        self.flags = ints[:world_size]
        self.acks = ints[world_size : 2 * world_size]
        self.command = ints[2 * world_size :]  # [seq, op, length, payload...]
        self.seq = 0  # exchanges done (the same count on every rank)
        self.command_seq = 0  # commands sent (rank 0) or read (the others)
        self.watch: Callable[[], None] | None = None  # raises if a rank is known to be gone

    @staticmethod
    def size_for(world_size: int) -> int:
        return _header_ints(world_size) * 8 + 2 * world_size * SLOT_BYTES

    @staticmethod
    def new_path(size: int) -> str | None:
        """A new file's path in /dev/shm, or None when it has not `size` bytes free (a container's
        /dev/shm is often 64 MiB: a mapping past it would kill the rank with SIGBUS on first touch)."""
        if not os.path.isdir("/dev/shm"):
            return None
        stat = os.statvfs("/dev/shm")
        if stat.f_bavail * stat.f_frsize < 2 * size:
            logger.warning("/dev/shm has under %d MiB free: tensor-parallel ranks exchange through gloo", size >> 19)
            return None
        return os.path.join("/dev/shm", f"kvserve-tp-{uuid.uuid4().hex}")

    def slot(self, buffer: int, rank: int) -> torch.Tensor:  # uint8 [SLOT_BYTES]
        start = self._slots_at + (buffer * self.world_size + rank) * SLOT_BYTES
        return self.memory[start : start + SLOT_BYTES]

    # ---- exchanges (every rank, in the same order)

    def all_reduce(self, x: torch.Tensor, timeout: float) -> torch.Tensor:
        """Sums contiguous CPU x across ranks, in place; every rank gets the same bits."""
        flat = x.view(-1)
        per = SLOT_BYTES // x.element_size()
        for start in range(0, flat.numel(), per):
            chunk = flat[start : start + per]
            parts = self._exchange(chunk, timeout)
            torch.add(parts[0], parts[1], out=chunk)
            for part in parts[2:]:
                chunk.add_(part)
        return x

    def gather(self, x: torch.Tensor, timeout: float) -> torch.Tensor | None:
        """Every rank's contiguous x (same shape) -> [N, *x.shape] on rank 0, None on the others."""
        flat = x.view(-1)
        out = x.new_empty((self.world_size, flat.numel())) if self.rank == 0 else None
        per = SLOT_BYTES // x.element_size()
        for start in range(0, flat.numel(), per):
            parts = self._exchange(flat[start : start + per], timeout)
            if out is not None:
                for r, part in enumerate(parts):
                    out[r, start : start + part.numel()] = part
        return out.view(self.world_size, *x.shape) if out is not None else None

    def broadcast(self, x: torch.Tensor, timeout: float) -> torch.Tensor:
        """Rank 0's contiguous x into every rank's x (same shape and dtype), in place."""
        flat = x.view(-1)
        per = SLOT_BYTES // x.element_size()
        for start in range(0, flat.numel(), per):
            chunk = flat[start : start + per]
            parts = self._exchange(chunk if self.rank == 0 else chunk[:0], timeout)
            if self.rank != 0:
                chunk.copy_(self.slot(self.seq % 2, 0)[: chunk.numel() * chunk.element_size()].view(chunk.dtype))
            del parts
        return x

    def _exchange(self, chunk: torch.Tensor, timeout: float) -> list[torch.Tensor]:
        self.seq += 1
        buffer = self.seq % 2
        nbytes = chunk.numel() * chunk.element_size()
        self.slot(buffer, self.rank)[:nbytes].view(chunk.dtype).copy_(chunk)
        self.flags[self.rank] = self.seq  # after the bytes: publishes them
        seq = self.seq
        self._wait(lambda: bool((self.flags >= seq).all()), timeout)
        return [self.slot(buffer, r)[:nbytes].view(chunk.dtype) for r in range(self.world_size)]

    # ---- commands (rank 0 -> the others)

    def send(self, op: int, payload: torch.Tensor, timeout: float) -> bool:
        """Rank 0: posts a command once every rank has read the previous one. Returns False when the
        payload is too long for the mapping: then the header says so and the payload goes by gloo."""
        sent = self.command_seq
        others = [r for r in range(self.world_size) if r != self.rank]
        self._wait(lambda: all(int(self.acks[r]) >= sent for r in others), timeout)
        inline = payload.numel() <= COMMAND_CAPACITY
        if inline:
            self.command[3 : 3 + payload.numel()] = payload
        self.command[1] = op
        self.command[2] = payload.numel() if inline else -payload.numel()
        self.command_seq += 1
        self.command[0] = self.command_seq  # last: publishes the command
        return inline

    def receive(self) -> tuple[int, int, torch.Tensor | None]:
        """The others: waits (without a timeout: the server may idle for days) for the next command;
        returns (op, length, payload), the payload None when it comes by gloo."""
        expected = self.command_seq + 1
        self._wait(lambda: int(self.command[0]) >= expected, None)
        op, length = int(self.command[1]), int(self.command[2])
        payload = self.command[3 : 3 + length].clone() if length >= 0 else None
        self.command_seq = expected
        self.acks[self.rank] = expected
        return op, abs(length), payload

    # ---- waiting

    def _wait(self, done: Callable[[], bool], timeout: float | None) -> None:
        start = last_watch = time.monotonic()
        spins = 0
        while not done():
            spins += 1
            if spins < 64:
                continue
            now = time.monotonic()
            waited = now - start
            if waited > SPIN_SECONDS:
                if waited < YIELD_SECONDS:
                    time.sleep(0)
                else:
                    time.sleep(NAP_SECONDS if waited < IDLE_SECONDS else IDLE_NAP_SECONDS)
            if now - last_watch > WATCH_SECONDS:
                last_watch = now
                if self.watch is not None:
                    self.watch()
                if timeout is not None and waited > timeout:
                    raise RankGone(f"no answer from the other ranks for {waited:.0f} s")

    def close(self) -> None:
        del self.memory, self.flags, self.acks, self.command
