"""The tensor-parallel process group and the few collectives the model and the engine use.

Backends: gloo on the CPU; NCCL for CUDA tensors, with a gloo group beside it for the control traffic
(the step's plan, the header of each command), which lives in host memory as vLLM's does.

Two groups: the forward's collectives run on the default group, whose `timeout` bounds a wait on
a rank that hangs without dying; commands from rank 0 go over a gloo control group without a
practical timeout, because a worker waits there for as long as the server is idle. Ranks that share
one x86-64 machine and compute on the CPU exchange through shared memory instead (shm.py: ~100x
faster than gloo's loopback TCP here); gloo then only carries the start-up and oversized commands.

Failure: a rank that dies closes its connections, so a collective waiting on it fails at once on
the others (gloo and NCCL raise). Every failure of a collective is a RankFailed: the group cannot be
trusted after it, and the engine stops rather than step with ranks out of step.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from kvserve.distributed.protocol import pack_plan
from kvserve.distributed.shm import SharedMemoryChannel

# Commands rank 0 sends the other ranks: a header [op, payload length], then the int64 payload.
OP_STEP, OP_COPY_BLOCKS, OP_COPY_WINDOW, OP_STOP, OP_KV_GATHER, OP_KV_SCATTER = 1, 2, 3, 4, 5, 6

DEFAULT_TIMEOUT = timedelta(minutes=5)  # a collective that waits longer means a rank hangs


IDLE_TIMEOUT = timedelta(days=365)  # the control group's: workers wait there while the server is idle


class RankFailed(RuntimeError):
    """A tensor-parallel rank died, hung, or fell out of step: the engine cannot run another step."""


@dataclass
class ParallelGroup:
    rank: int
    world_size: int
    device: torch.device
    vocab_size: int = 0  # the whole model's, for gathering the vocabulary-parallel logits
    control: dist.ProcessGroup | None = field(default=None, repr=False)  # gloo, for commands and host tensors
    shm: SharedMemoryChannel | None = field(default=None, repr=False)  # one machine's ranks on the CPU
    timeout: float = DEFAULT_TIMEOUT.total_seconds()
    # Set when a collective failed or was interrupted (an exception, Ctrl-C) part-way: the ranks may be at
    # different points of the sequence of collectives, so nothing is sent or exchanged any more.
    broken: bool = False

    def check(self) -> None:
        if self.broken:
            raise RankFailed("the tensor-parallel group failed earlier; the engine cannot step any more")

    def fail(self, message: str, cause: BaseException | None = None) -> RankFailed:
        """Marks the group broken; returns the RankFailed to raise."""
        self.broken = True
        error = RankFailed(message)
        error.__cause__ = cause
        return error

    @classmethod
    def join(
        cls,
        rank: int,
        world_size: int,
        init_method: str,
        device: torch.device,
        same_machine: bool,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> ParallelGroup:
        """Joins the group (blocks until all world_size ranks have joined, at most `timeout`)."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        group = cls(rank, world_size, device, control=control, timeout=timeout.total_seconds())
        if same_machine and device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64"):
            group.shm = _open_shared_memory(rank, world_size, control)
        return group

    @property
    def watch(self) -> Callable[[], None] | None:
        return self.shm.watch if self.shm is not None else None

    @watch.setter
    def watch(self, check: Callable[[], None]) -> None:
        """A check that raises RankFailed when a rank is known to be gone, called while a shared-memory
        wait lasts (gloo notices a dead peer by its closed connection)."""
        if self.shm is not None:
            self.shm.watch = check

    def leave(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- in the forward (every rank, in the same order)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x across ranks, in place (the partial products of a row-parallel layer)."""
        self.check()
        try:
            if self.shm is not None and x.is_contiguous():
                return self.shm.all_reduce(x, self.timeout)
            dist.all_reduce(x)
        except BaseException as exc:
            raise self.fail(f"tensor-parallel all-reduce failed: {exc!r}", exc) from exc
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Each rank's [S, its vocabulary rows] logits -> the whole [S, V] on rank 0 (None on the others).
        Ranges are ceil(V/N) rows; a shorter last one is padded for the gather and cut after."""
        per = -(-self.vocab_size // self.world_size)
        if logits.shape[-1] < per:
            pad = logits.new_full((logits.shape[0], per - logits.shape[-1]), float("-inf"))
            logits = torch.cat((logits, pad), dim=-1)
        logits = logits.contiguous()
        parts = self.gather_rows(logits)  # [N, S, per] on rank 0
        return parts.permute(1, 0, 2).flatten(1)[:, : self.vocab_size] if parts is not None else None

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's contiguous x (same shape) -> [N, *x.shape] on rank 0, None on the others."""
        self.check()
        try:
            if self.shm is not None:
                return self.shm.gather(x, self.timeout)
            parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
            dist.gather(x, parts, dst=0)
        except BaseException as exc:
            raise self.fail(f"tensor-parallel gather failed: {exc!r}", exc) from exc
        return torch.stack(parts) if parts is not None else None

    def broadcast_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's contiguous x into every rank's x, in place."""
        self.check()
        try:
            if self.shm is not None:
                return self.shm.broadcast(x, self.timeout)
            dist.broadcast(x, src=0)
        except BaseException as exc:
            raise self.fail(f"tensor-parallel broadcast failed: {exc!r}", exc) from exc
        return x

    def min_over_ranks(self, values: list[int]) -> list[int]:
        """Elementwise minimum across ranks (e.g. KV blocks that every rank's budget holds)."""
        t = torch.tensor(values, dtype=torch.int64)
        self._control(dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return t.tolist()

    # ---- commands from rank 0

    def send(self, op: int, payload: torch.Tensor | None = None) -> None:
        """Rank 0: a command to every other rank."""
        payload = payload if payload is not None else torch.empty(0, dtype=torch.int64)
        self.check()
        if self.shm is not None:
            try:
                inline = self.shm.send(op, payload, self.timeout)
            except BaseException as exc:
                raise self.fail(f"tensor-parallel command not taken: {exc!r}", exc) from exc
            if not inline:
                self._control(dist.broadcast, payload, src=0)
            return
        self._control(dist.broadcast, torch.tensor([op, payload.numel()], dtype=torch.int64), src=0)
        if payload.numel():
            self._control(dist.broadcast, payload, src=0)

    def send_step(self, plan) -> None:
        self.send(OP_STEP, pack_plan(plan))

    def receive(self) -> tuple[int, torch.Tensor]:
        """The other ranks: the next command, as (op, int64 payload)."""
        if self.shm is not None:
            try:
                op, length, payload = self.shm.receive()
            except BaseException as exc:
                raise self.fail(f"tensor-parallel rank {self.rank}: {exc!r}", exc) from exc
            if payload is None:
                payload = torch.empty(length, dtype=torch.int64)
                self._control(dist.broadcast, payload, src=0)
            return op, payload
        header = torch.empty(2, dtype=torch.int64)
        self._control(dist.broadcast, header, src=0)
        op, length = header.tolist()
        payload = torch.empty(length, dtype=torch.int64)
        if length:
            self._control(dist.broadcast, payload, src=0)
        return op, payload

    def _control(self, collective, tensor: torch.Tensor, **kwargs) -> None:
        """A collective on the control group (gloo, host memory)."""
        try:
            collective(tensor, group=self.control, **kwargs)
        except BaseException as exc:
            raise self.fail(f"tensor-parallel {collective.__name__} failed: {exc!r}", exc) from exc


def _open_shared_memory(rank: int, world_size: int, control: dist.ProcessGroup) -> SharedMemoryChannel | None:
    """Rank 0 creates the mapping's file and sends its path (None: not enough room, and every rank stays on
    gloo); once every rank has mapped it, the file is removed (the mappings stay), so that nothing is left
    in /dev/shm however the ranks end."""
    path = [None]
    if rank == 0:
        path[0] = SharedMemoryChannel.new_path(SharedMemoryChannel.size_for(world_size))
    dist.broadcast_object_list(path, src=0, group=control)
    if path[0] is None:
        return None
    try:
        if rank == 0:
            channel = SharedMemoryChannel(path[0], rank, world_size, create=True)
        dist.barrier(group=control)  # the file exists before the others map it
        if rank != 0:
            channel = SharedMemoryChannel(path[0], rank, world_size, create=False)
        dist.barrier(group=control)  # every rank has mapped it: it can go
    finally:
        if rank == 0 and os.path.exists(path[0]):
            os.unlink(path[0])
    return channel
