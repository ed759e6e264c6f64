"""Starting the tensor-parallel ranks, and the loop a worker rank runs.

Launch modes (EngineConfig: tensor_parallel_size N, nnodes, node_rank, master_addr, master_port):
- One machine (nnodes 1): the engine's process is rank 0 and spawns ranks 1..N-1 itself
  (torch.multiprocessing, spawn), on a free port of master_addr.
- Several machines: every node runs the same `kvserve serve` command with its --node-rank; node k's
  process is rank k N/nnodes and spawns the node's other ranks. Node 0's serves; the others only
  compute (run_node_workers).
- torchrun: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT come from the environment
  (env://); each process is one rank and nothing is spawned.

On the CPU each rank of a node gets an equal share of the node's cores (--num-threads, default all
of them), pinned, so that no two ranks' OpenMP teams share a core. A spawned rank exits with its
parent (PR_SET_PDEATHSIG), so that a killed engine leaves no process behind.

After joining, rank 0 sends (broadcast_object_list, once) the resolved EngineConfig and the model's
path; each worker loads its shard, the ranks agree on the KV blocks every rank's budget holds (the
minimum), and the worker then runs the commands rank 0 sends until OP_STOP.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvserve.child_process import die_with_parent
from kvserve.config import EngineConfig
from kvserve.distributed.block_io import serve_block_io
from kvserve.distributed.group import (
    OP_COPY_BLOCKS,
    OP_COPY_WINDOW,
    OP_KV_GATHER,
    OP_KV_SCATTER,
    OP_STEP,
    OP_STOP,
    ParallelGroup,
    RankFailed,
)
from kvserve.distributed.protocol import unpack_plan
from kvserve.heap import load_outside_the_heap, settle_heap
from kvserve.kv.block_io import BlockIO

logger = logging.getLogger(__name__)

JOIN_POLL_SECONDS = 0.2
STOP_WAIT_SECONDS = 10.0  # a worker told to stop that has not exited by then is killed


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ)


def is_worker_node(config: EngineConfig) -> bool:
    """This process is not rank 0: another node's first rank, or a torchrun rank other than 0."""
    return int(os.environ["RANK"]) != 0 if under_torchrun() else config.node_rank != 0


def node_ranks(config: EngineConfig) -> range:
    """The global ranks this node runs."""
    per_node = config.tensor_parallel_size // config.nnodes
    return range(config.node_rank * per_node, (config.node_rank + 1) * per_node)


def rank_cores(config: EngineConfig) -> list[list[int]]:
    """Each of this node's ranks' cores: num_threads (default: every core this process may use) split
    evenly; with fewer cores than ranks, each rank gets one, shared round-robin."""
    available = sorted(os.sched_getaffinity(0))
    count = len(node_ranks(config))
    total = min(config.num_threads or len(available), len(available))
    per_rank = total // count
    if per_rank < 1:
        logger.warning("%d tensor-parallel ranks share %d cores", count, total)
        return [[available[i % total]] for i in range(count)]
    return [available[i * per_rank : (i + 1) * per_rank] for i in range(count)]


def use_cores(cores: list[int], device: torch.device) -> None:
    """Pins the calling thread (and the threads it starts later: OpenMP's) to cores, one thread each."""
    if device.type == "cpu":
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if config.torch_device.type == "cuda" else config.torch_device


@dataclass
class TensorParallelRanks:
    """Rank 0's handle on the group and on the ranks it spawned: the engine sends commands through
    `group`, checks `alive()` before a step, and `close()`s at the end."""

    group: ParallelGroup
    processes: list = field(default_factory=list)  # the workers this process spawned
    closed: bool = False
    restore: tuple[set[int], int] | None = None  # the calling thread's cores and torch threads before start

    @property
    def failed(self) -> bool:
        return self.group.broken

    def alive(self) -> None:
        """RankFailed if a spawned worker has exited (ranks on other nodes show up in the collectives)."""
        for rank, proc in self.processes:
            if proc.exitcode is not None:
                raise self.group.fail(f"tensor-parallel rank {rank} exited (exit code {proc.exitcode})")

    def close(self) -> None:
        """Stops the workers (OP_STOP; killed if they do not exit, or at once after a failure). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self.failed:
            try:
                self.group.send(OP_STOP)
            except RankFailed:
                pass  # now failed: the workers are killed below
        for _, proc in self.processes:
            proc.join(timeout=0 if self.failed else STOP_WAIT_SECONDS)
            if proc.exitcode is None:
                proc.kill()
                proc.join(timeout=STOP_WAIT_SECONDS)
        self.group.leave()  # after a failure too: another engine in this process may form a new group
        if self.restore is not None:  # the process may go on without tensor parallelism (LLM in a script, tests)
            os.sched_setaffinity(0, self.restore[0])
            torch.set_num_threads(self.restore[1])


def start_ranks(config: EngineConfig, model_path: str) -> TensorParallelRanks:
    """Rank 0 (the engine's process, config resolved): joins the group with the ranks it spawns (and
    those of other nodes), and sends them the config and the model's path."""
    restore = (os.sched_getaffinity(0), torch.get_num_threads())
    ranks, processes = _start_node(config)
    try:
        group = _join(0, config, processes)
        dist.broadcast_object_list([config, model_path], src=0, group=group.control)
    except BaseException:
        _kill(processes)
        os.sched_setaffinity(0, restore[0])
        torch.set_num_threads(restore[1])
        raise
    ranks = TensorParallelRanks(group, processes, restore=restore)
    group.watch = ranks.alive
    return ranks


def run_node_workers(config: EngineConfig) -> int:
    """A node other than 0 (`kvserve serve --node-rank k`): its first rank runs here, the others are
    spawned; returns when rank 0 stops them. (Under torchrun: this one rank.)
    Spawned ranks end when the thread that spawned them does (PR_SET_PDEATHSIG is per thread): start
    an engine with tensor parallelism from a thread that lives as long as it (the server's engine thread,
    or a script's main thread)."""
    if config.device == "auto":  # rank 0's resolved config arrives after the join; the device is needed before
        config.device = "cuda" if torch.cuda.is_available() else "cpu"
    config.torch_device = torch.device(config.device)
    ranks, processes = _start_node(config)
    local_rank = int(os.environ["LOCAL_RANK"]) if under_torchrun() else 0
    try:
        return _worker(ranks[0], config, local_rank, processes)
    finally:
        _kill(processes)


def _start_node(config: EngineConfig) -> tuple[range, list]:
    if under_torchrun():
        return range(int(os.environ["RANK"]), int(os.environ["RANK"]) + 1), []
    ranks = node_ranks(config)
    cores = rank_cores(config)
    use_cores(cores[0], rank_device(config, 0))
    context = mp.get_context("spawn")
    processes = []
    for local in range(1, len(ranks)):
        proc = context.Process(
            target=_spawned_worker,
            args=(ranks[local], config, local, cores[local], os.getpid()),
            name=f"kvserve-tp{ranks[local]}",
            daemon=True,
        )
        proc.start()
        processes.append((ranks[local], proc))
    return ranks, processes


def _init_method(config: EngineConfig) -> str:
    if under_torchrun():
        return "env://"
    return f"tcp://{config.master_addr}:{config.master_port}"


def _join(rank: int, config: EngineConfig, processes: list) -> ParallelGroup:
    """Joins the group, watching the spawned workers meanwhile: one that dies before joining (a
    failed import, a bad device) fails the start at once instead of after the join's timeout."""
    local = int(os.environ.get("LOCAL_RANK", 0)) if under_torchrun() else rank - node_ranks(config)[0]
    device = rank_device(config, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device is per thread: this one computes
    result: dict = {}

    def join() -> None:
        try:
            result["group"] = ParallelGroup.join(
                rank, config.tensor_parallel_size, _init_method(config), device, same_machine=_one_machine(config)
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=join, name="kvserve-tp-join", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(JOIN_POLL_SECONDS)
        for other, proc in processes:
            if proc.exitcode is not None:
                raise RankFailed(f"tensor-parallel rank {other} exited while starting (exit code {proc.exitcode})")
    if "error" in result:
        raise RankFailed(f"tensor-parallel rank {rank} could not join the group: {result['error']}") from result[
            "error"
        ]
    return result["group"]


def _one_machine(config: EngineConfig) -> bool:
    if under_torchrun():
        return os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    return config.nnodes == 1


def _kill(processes: list) -> None:
    for _, proc in processes:
        if proc.exitcode is None:
            proc.kill()
        proc.join(timeout=STOP_WAIT_SECONDS)


def _spawned_worker(rank: int, config: EngineConfig, local_rank: int, cores: list[int], parent_pid: int) -> None:
    die_with_parent(signal.SIGKILL)  # a rank without rank 0 has nothing to finish
    if os.getppid() != parent_pid:  # rank 0 died before the line above
        os._exit(1)
    # Ctrl-C in a terminal and a service manager's SIGTERM reach every process of the group: rank 0 drains
    # its requests, which needs this rank; it ends on OP_STOP, or with rank 0 (PDEATHSIG).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    use_cores(cores, rank_device(config, local_rank))
    try:
        code = _worker(rank, config, local_rank, [])
    except BaseException:  # noqa: BLE001 - the traceback goes to the log, the exit code to rank 0
        traceback.print_exc()
        os._exit(1)
    os._exit(code)  # no interpreter teardown: torch's atexit hooks would wait on the dead group


def _worker(rank: int, config: EngineConfig, local_rank: int, processes: list) -> int:
    """Joins, loads this rank's shard, then runs rank 0's commands until OP_STOP. Returns 0."""
    from kvserve.engine import kv_budget
    from kvserve.runner import ModelRunner, load_model

    group = _join(rank, config, processes)
    parent = os.getppid()

    def watch() -> None:  # the spawned ranks exit with their parent; one that sees it gone stops waiting
        if os.getppid() != parent:
            raise RankFailed(f"tensor-parallel rank {rank}: rank 0 is gone")
        for other, proc in processes:
            if proc.exitcode is not None:
                raise RankFailed(f"tensor-parallel rank {other} exited (exit code {proc.exitcode})")

    group.watch = watch
    received = [None, None]
    dist.broadcast_object_list(received, src=0, group=group.control)
    config, model_path = received
    config.device = str(rank_device(config, local_rank))
    config.torch_device = torch.device(config.device)
    with load_outside_the_heap():  # as rank 0 loads (kvserve/heap.py)
        _, model = load_model(model_path, config, group)
        num_blocks, open_slots = group.min_over_ranks(list(kv_budget(config, model)[:2]))
        runner = ModelRunner(config, model, num_blocks, open_slots, kv=None, tp=group)
    settle_heap()
    logger.info("tensor-parallel rank %d of %d ready: %d KV blocks", rank, group.world_size, num_blocks)
    block_io: BlockIO | None = None
    with torch.inference_mode():
        while True:
            op, payload = group.receive()
            if op == OP_STEP:
                runner.run(unpack_plan(payload))
            elif op == OP_COPY_BLOCKS:
                half = payload.numel() // 2
                runner.copy_blocks(list(zip(payload[:half].tolist(), payload[half:].tolist())))
            elif op == OP_COPY_WINDOW:
                runner.copy_window_slot(*payload.tolist())
            elif op in (OP_KV_GATHER, OP_KV_SCATTER):  # the cache tiers, run by rank 0
                block_io = block_io or BlockIO(runner.kv_caches)
                serve_block_io(op, payload.tolist(), block_io, group)
            elif op == OP_STOP:
                group.leave()
                return 0
            else:
                raise RankFailed(f"tensor-parallel rank {rank}: unknown command {op}")
