"""`kvserve serve --data-parallel-size N`: N engine processes on this machine behind the router.

Each worker is a `kvserve serve` child process:
- on 127.0.0.1 at a free port, with the engine options this command was given (so --kv-cache-memory
  is per worker), and its KV events on two free ports of 127.0.0.1;
- with its share of the threads: --num-threads (default: the cores this process may run on) split
  evenly, each worker pinned to its own cores, so two engines' OpenMP teams never share a core.

The router runs in this process, on --host:--port, once every worker is healthy. A worker that dies is
started again (after a pause, so a worker that cannot start does not spin); the router takes it out
meanwhile and back in when its health check passes. SIGTERM/SIGINT: the router stops, then each worker
drains its requests (--shutdown-timeout) and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx

from kvserve.child_process import die_with_parent
from kvserve.config import EngineConfig
from kvserve.server.launch import free_port

logger = logging.getLogger("kvserve.router")

RESTART_PAUSE = 5.0  # seconds before a dead worker is started again
_SERVE_OPTIONS = ("api_key", "served_model_name", "max_request_bytes", "tool_call_parser", "shutdown_timeout")


@dataclass
class WorkerProcess:
    rank: int
    port: int
    cores: list[int]
    command: list[str]
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cores = set(self.cores)

        def in_child() -> None:
            os.sched_setaffinity(0, cores)
            die_with_parent(signal.SIGTERM)  # a worker drains on SIGTERM

        self.proc = subprocess.Popen(self.command, preexec_fn=in_child)


def split_cores(num_workers: int, num_threads: int) -> list[list[int]]:
    """Each worker's cores: the cores this process may use, in order, num_threads // num_workers each."""
    available = sorted(os.sched_getaffinity(0))
    total = num_threads or len(available)
    if total > len(available):
        raise ValueError(f"num_threads {total} exceeds the {len(available)} cores this process may use")
    per_worker = total // num_workers
    if per_worker < 1:
        raise ValueError(f"data_parallel_size {num_workers} needs at least {num_workers} threads, has {total}")
    return [available[i * per_worker : (i + 1) * per_worker] for i in range(num_workers)]


def worker_command(args: argparse.Namespace, port: int, num_threads: int) -> list[str]:
    """`kvserve serve` for one worker: this command's engine and serving options, its own port, threads and
    KV events."""
    level = logging.getLevelName(logging.getLogger().level)
    command = [sys.executable, "-m", "kvserve.cli", "--log-level", level, "serve", "--port", str(port)]
    defaults = EngineConfig()
    for name in EngineConfig.option_names():
        value = getattr(args, name)
        if name == "num_threads" or value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + flag[2:])
        else:
            command += [flag, str(value)]
    for name in _SERVE_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            command += ["--" + name.replace("_", "-"), str(value)]
    command += ["--num-threads", str(num_threads)]
    command += ["--kv-events-endpoint", f"tcp://127.0.0.1:{free_port()}"]
    command += ["--kv-events-replay-endpoint", f"tcp://127.0.0.1:{free_port()}"]
    return command


class Supervisor:
    """Starts the workers, waits until they serve, restarts one that dies, and stops them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        n = args.data_parallel_size
        if args.kv_events_endpoint is not None:
            raise ValueError(
                "with --data-parallel-size each worker publishes KV events on ports of its own: "
                "drop --kv-events-endpoint"
            )
        self.workers = []
        for rank, cores in enumerate(split_cores(n, args.num_threads)):
            port = free_port()
            self.workers.append(WorkerProcess(rank, port, cores, worker_command(args, port, len(cores))))
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="kvserve-replicas", daemon=True)

    def start(self, timeout: float = 600.0) -> None:
        for worker in self.workers:
            worker.start()
            logger.info("worker %d on %s, cores %s", worker.rank, worker.url, worker.cores)
        deadline = time.monotonic() + timeout
        pending = list(self.workers)
        while pending:
            for worker in list(pending):
                if worker.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"worker {worker.rank} exited with {worker.proc.returncode} while starting")
                try:
                    if httpx.get(worker.url + "/health", timeout=1.0).status_code == 200:
                        pending.remove(worker)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"workers not healthy after {timeout:.0f} s")
            time.sleep(0.25)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for worker in self.workers:
                if worker.proc.poll() is not None and not self._stopping.is_set():
                    logger.error("worker %d exited with %s: starting it again", worker.rank, worker.proc.returncode)
                    if self._stopping.wait(RESTART_PAUSE):
                        return
                    worker.start()

    def stop(self) -> None:
        """SIGTERM to every worker (each drains), then waits for them."""
        self._stopping.set()
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.terminate()
        for worker in self.workers:
            if worker.proc is None:
                continue
            try:
                worker.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()


def run_replicas(args: argparse.Namespace) -> int:
    from kvserve.router.main import run_router

    supervisor = Supervisor(args)
    supervisor.start()
    try:
        return run_router(args, [w.url for w in supervisor.workers], args.model)
    finally:
        supervisor.stop()
