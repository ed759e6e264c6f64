"""AsyncEngine: the (single-threaded) Engine behind asyncio, for the HTTP server.

Why a thread and not a process: the Engine is not thread-safe, so exactly one thread, the engine
thread, ever calls it. On this project's hardware (a few CPU cores, or one GPU) the engine's time
goes into torch kernels, which release the GIL, so the asyncio loop in the main thread stays
responsive (/health answers within milliseconds while a forward runs). A separate engine process
would need IPC for every request, delta and statistic (token lists for 64 streams at every step)
and a second copy of the tokenizer, for no gain in parallelism on 2 cores. If the Python side of a
step ever dominates, the process split is the next step; the interface (submit, stream deltas,
abort) would stay.

The Engine is built on the engine thread, and the asyncio thread never runs torch: with torch's
OpenMP backend each thread that opens a parallel region gets its own worker team, and once the
main thread owns one, another thread's team ran here at about half speed (an 8x576 @ 576x1536
matmul: 77 us on the main thread, 170 us on a second one; whole-engine decode -30%). Built and run
on one thread, with no other team, the server's engine runs at offline (LLM.generate) speed.

Protocol between the threads:
  HTTP -> engine: commands on a thread-safe SimpleQueue (add a group of requests, abort, stop).
                  The engine thread blocks on it while idle (no busy loop).
  engine -> HTTP: after each step, ONE loop.call_soon_threadsafe carrying every channel's events
                  (deltas, final RequestOutputs, errors) for that step.
A `RequestChannel` belongs to one HTTP request and may carry several engine requests (a completion
with a list of prompts). Adding a group is all-or-none: if one prompt is rejected, the others are
aborted in the same engine-thread turn, before any step, and the error goes back to that HTTP
request only. Invariant: every request id in `_live` is in the engine, and leaves `_live` exactly
when it leaves the engine (popped when finished, or aborted).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from kvserve.engine import Engine, StepFailed
from kvserve.heap import return_freed_memory
from kvserve.outputs import RequestOutput, SequenceDelta
from kvserve.sampling_params import SamplingParams
from kvserve.server.stats_log import EngineObserver, PeriodicStats, RequestRecord, log_request

logger = logging.getLogger("kvserve.async_engine")


# Engine steps that may fail in a row (each failing only its own requests) before the engine is declared
# broken: one bad request fails one step; a broken model or device fails every step.
MAX_FAILED_STEPS = 3


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (crashed or shut down); no request can be served."""


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-waiting-requests allows."""


class QueueTimeoutError(RuntimeError):
    """A request waited longer than --max-queue-time without being scheduled."""


@dataclass
class Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None


@dataclass
class _Live:
    """Engine-thread bookkeeping of one engine request."""

    channel: RequestChannel
    num_prompt_tokens: int
    arrival_time: float
    wants_prompt_logprobs: bool
    first_token_time: float | None = None
    last_token_time: dict[int, float] = field(default_factory=dict)  # per sequence index
    inter_token_latencies: list[float] = field(default_factory=list)


class RequestChannel:
    """The events of one HTTP request's engine requests, delivered on the asyncio loop.

    Iterate it to get (request_id, deltas) per step; when every request is done, `outputs` holds
    their RequestOutputs. Raises EngineDeadError if the engine stops underneath it."""

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self.queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        self.outputs: dict[str, RequestOutput] = {}
        # prompt logprobs (for echo), delivered before a request's first deltas when it asked for them
        self.prompt_logprobs: dict[str, list[dict[int, float] | None]] = {}
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def finished(self) -> bool:
        return len(self.outputs) == len(self.request_ids)

    async def __aiter__(self) -> AsyncIterator[tuple[str, list[SequenceDelta]]]:
        while not self.finished:
            kind, request_id, payload = await self.queue.get()
            if kind == "deltas":
                yield request_id, payload
            elif kind == "done":
                self.outputs[request_id] = payload
            elif kind == "prompt":
                self.prompt_logprobs[request_id] = payload
            else:  # "error"
                raise payload


class AsyncEngine:
    """`AsyncEngine(lambda: Engine(config))`: `launch()` builds the engine on the engine thread (blocking until it
    is loaded, re-raising its error), `attach_loop()` connects the asyncio loop that consumes the channels;
    `start()` does both, from inside the loop."""

    def __init__(self, engine_factory: Callable[[], Engine], observer: EngineObserver | None = None) -> None:
        self.engine_factory = engine_factory
        self.engine: Engine | None = None  # set by the engine thread; other threads only read its constants
        self.observer = observer
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}  # engine thread only
        self._lock = threading.Lock()  # orders "submit" against "die", so no command is left unanswered
        self._error: BaseException | None = None
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prompt_tokens_added = 0  # of accepted requests, for the prompt-token counter and stats line
        self._stats: PeriodicStats | None = None
        self._failed_steps = 0  # engine steps that raised, in a row

    # ------------------------------------------------------------------ asyncio side

    def launch(self) -> Engine:
        """Starts the engine thread and waits until it has built the engine; re-raises a construction error."""
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.engine is None:
            self._thread.join()
            assert self._error is not None
            raise self._error
        return self.engine

    def attach_loop(self) -> None:
        """Events go to the running asyncio loop from now on; call before the first submit."""
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self.attach_loop()
        self.launch()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None and not self._stopped

    async def submit(self, submissions: list[Submission]) -> RequestChannel:
        """Queues the group; returns its channel once the engine thread accepted all of it.
        Raises ValueError (bad input), QueueFullError or EngineDeadError, and then nothing is queued."""
        channel = RequestChannel([s.request_id for s in submissions])
        self._put(("add", (channel, submissions, time.monotonic())))
        try:
            await asyncio.shield(channel.accepted)
        except asyncio.CancelledError:
            self.abort(channel)  # the client left before acceptance: the abort follows the add in the inbox
            channel.accepted.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it now
            raise
        return channel

    async def compile_grammar(self, spec) -> None:
        """Compiles a structured-outputs spec on a worker thread, into the engine's cache, so that the
        engine thread finds it compiled when the request arrives: the request waits for its grammar,
        the step loop does not. Raises ValueError if it does not compile. (xgrammar, not torch: safe
        off the engine thread.)"""
        if self.engine is None:
            raise EngineDeadError("the engine is not running")
        await asyncio.to_thread(self.engine.compile_grammar, spec)

    async def inspect(self, read: Callable[[Engine], Any]) -> Any:
        """`read(engine)`, run on the engine thread between steps (the engine is not thread-safe): for reads of
        its state, such as the prefix cache's block hashes. Raises EngineDeadError, or what `read` raised."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("inspect", (read, future)))
        return await asyncio.wrap_future(future)

    def abort(self, channel: RequestChannel) -> None:
        """Aborts whatever of the channel's requests is unfinished; blocks are freed on the engine's next turn."""
        pending = [r for r in channel.request_ids if r not in channel.outputs]
        if not pending:
            return
        with self._lock:  # never raises: a stopped or dead engine has nothing left to abort
            if self._error is None and not self._stopped:
                self._inbox.put(("abort", pending))

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Aborts everything still running and stops the engine thread."""
        if self._thread is None or not self._thread.is_alive():
            return
        with self._lock:  # from here on nothing can be submitted: "stop" is the inbox's last command
            self._stopped = True
            self._inbox.put(("stop", None))
        await asyncio.to_thread(self._thread.join, timeout)

    def _put(self, command: tuple[str, Any]) -> None:
        with self._lock:
            if self._error is not None or self._stopped:
                raise EngineDeadError("the engine is not running")
            self._inbox.put(command)

    def _deliver(self, events: list[tuple[RequestChannel, str, str, Any]]) -> None:
        """Engine thread -> loop: one callback per turn carries every event."""
        if not events or self._loop is None:
            return

        def dispatch() -> None:
            for channel, kind, request_id, payload in events:
                if kind == "accepted":
                    if not channel.accepted.done():
                        channel.accepted.set_result(None)
                elif kind == "rejected":
                    if not channel.accepted.done():
                        channel.accepted.set_exception(payload)
                else:
                    channel.queue.put_nowait((kind, request_id, payload))

        try:
            self._loop.call_soon_threadsafe(dispatch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            engine = self.engine_factory()
            self._stats = PeriodicStats(engine.config.log_stats_interval)
            self.max_waiting_requests = engine.config.max_waiting_requests
            self.max_queue_time = engine.config.max_queue_time
            self.engine = engine
        except BaseException as exc:  # noqa: BLE001 - launch() re-raises it on the caller's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                idle = not self.engine.has_unfinished()
                commands = self._take_commands(block=idle)
                self._stats.turn_started(self.engine, self._prompt_tokens_added)
                events: list[tuple[RequestChannel, str, str, Any]] = []
                for kind, payload in commands:
                    if kind == "stop":
                        self._stop(events)
                        self._deliver(events)
                        return
                    if kind == "add":
                        self._add(*payload, events)
                    elif kind == "abort":
                        for request_id in payload:
                            self._abort(request_id, "abort")
                    elif kind == "inspect":
                        read, future = payload
                        try:
                            future.set_result(read(self.engine))
                        except Exception as exc:  # noqa: BLE001 - the caller gets it
                            future.set_exception(exc)
                if self.max_queue_time is not None:
                    self._expire_waiting(events)
                self._deliver(events)  # answers to adds go out before the step (which may raise)
                events = []
                if self.engine.has_unfinished():
                    self._publish(self._step(events), events)
                    self._stats.busy = True
                    if not self.engine.has_unfinished():
                        self._fell_idle()
                elif commands:
                    self._fell_idle()  # e.g. the last request was just aborted
                self._deliver(events)
                if self.observer is not None:
                    self.observer.on_loop(self.engine, self._prompt_tokens_added)
                self._stats.maybe_log(self.engine, self._prompt_tokens_added)
        except BaseException as exc:  # noqa: BLE001 - anything that kills the loop must fail every request
            logger.exception("engine loop died")
            self._die(exc)

    def _step(self, events: list) -> list[SequenceDelta]:
        """engine.step(); a StepFailed fails that step's requests alone. MAX_FAILED_STEPS failures in a row
        mean the engine itself is broken (not one request): the loop stops, /health turns 503, every
        request fails, rather than failing each new request one step at a time."""
        try:
            deltas = self.engine.step()
        except StepFailed as exc:
            self._failed_steps += 1
            logger.error(
                "engine step failed (%d in a row), failing its %d requests: %s",
                self._failed_steps,
                len(exc.outputs),
                exc.cause,
                exc_info=exc.cause,
            )
            now = time.monotonic()
            for request_id, output in exc.outputs.items():
                live = self._live.pop(request_id, None)
                if live is not None:
                    self._record(request_id, live, output, "error", now)
                    events.append((live.channel, "error", request_id, exc))
            if self._failed_steps >= MAX_FAILED_STEPS:
                self._deliver(events[:])  # this step's failures first: _die answers only the requests still live
                events.clear()  # (a copy went out: dispatch reads the list later, on the loop's thread)
                raise RuntimeError(f"{self._failed_steps} engine steps in a row failed; the last: {exc.cause}") from exc
            return []
        self._failed_steps = 0
        return deltas

    def _expire_waiting(self, events: list) -> None:
        """Ends the requests that have waited longer than --max-queue-time without running: an answer the
        client can act on (503, retry elsewhere) instead of a wait past its own timeout."""
        for request_id in self.engine.waiting_since(time.monotonic() - self.max_queue_time):
            live = self._live.get(request_id)
            if live is None:
                continue
            self._abort(request_id, "queue_timeout")
            error = QueueTimeoutError(
                f"the request waited {self.max_queue_time:g} s without being scheduled (--max-queue-time); "
                "the server is overloaded: retry later"
            )
            events.append((live.channel, "error", request_id, error))

    def _fell_idle(self) -> None:
        """Whenever the engine falls idle. The heap's free pages go back to the OS (malloc_trim, ~1 ms): what a
        busy spell freed would otherwise stay resident (glibc keeps it in its arenas), and an idle server's
        RSS is what it holds. And the DESIGN invariant is checked: no request left, every block free or
        cached-and-evictable; a violation is an engine bug, logged loudly, but the server keeps serving."""
        return_freed_memory()
        check = getattr(self.engine, "check_idle", None)
        if check is None:
            return
        try:
            check()
        except AssertionError:
            logger.exception("KV blocks leaked: the engine is idle but holds blocks")

    def _take_commands(self, block: bool) -> list[tuple[str, Any]]:
        commands = []
        if block:
            # Idle: sleep until a command arrives, waking once more to write the final stats line.
            timeout = self._stats.idle_timeout()
            try:
                commands.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, channel: RequestChannel, submissions: list[Submission], arrival: float, events: list) -> None:
        added: list[str] = []
        try:
            for sub in submissions:
                if len(self.engine.scheduler.waiting) >= self.max_waiting_requests:
                    raise QueueFullError(
                        f"the server is busy: {len(self.engine.scheduler.waiting)} requests are waiting "
                        f"(--max-waiting-requests {self.max_waiting_requests}); retry later"
                    )
                self.engine.add_request(sub.prompt_token_ids, sub.params, sub.request_id, prompt_text=sub.prompt_text)
                added.append(sub.request_id)
                wants = sub.params.prompt_logprobs is not None
                self._live[sub.request_id] = _Live(channel, len(sub.prompt_token_ids), arrival, wants)
        except Exception as exc:  # noqa: BLE001 - any add failure is this request's alone
            for request_id in added:
                self._live.pop(request_id, None)
                self.engine.abort(request_id)
            events.append((channel, "rejected", "", exc))
            return
        self._prompt_tokens_added += sum(len(s.prompt_token_ids) for s in submissions)
        events.append((channel, "accepted", "", None))

    def _publish(self, deltas: list[SequenceDelta], events: list) -> None:
        now = time.monotonic()
        by_request: dict[str, list[SequenceDelta]] = {}
        for delta in deltas:
            by_request.setdefault(delta.request_id, []).append(delta)
        for request_id, group in by_request.items():
            live = self._live.get(request_id)
            if live is None:
                continue
            if live.wants_prompt_logprobs:
                live.wants_prompt_logprobs = False
                prompt_logprobs = self.engine.request_output(request_id).prompt_logprobs
                events.append((live.channel, "prompt", request_id, prompt_logprobs))
            for delta in group:
                if not delta.token_ids:
                    continue
                if live.first_token_time is None:
                    live.first_token_time = now
                last = live.last_token_time.get(delta.index)
                if last is not None:
                    live.inter_token_latencies.append((now - last) / len(delta.token_ids))
                live.last_token_time[delta.index] = now
            events.append((live.channel, "deltas", request_id, group))
        # A request is done when all n sequences are; checking every live one also catches one that
        # finished without a delta in this step.
        for request_id in by_request:
            if request_id in self._live and self.engine.is_finished(request_id):
                self._finish(request_id, events, now)
        if not self.engine.has_unfinished():
            for request_id in list(self._live):
                if self.engine.is_finished(request_id):
                    self._finish(request_id, events, now)

    def _finish(self, request_id: str, events: list, now: float) -> None:
        live = self._live.pop(request_id)
        output = self.engine.pop_finished(request_id)
        reasons = {o.finish_reason for o in output.outputs}
        self._record(request_id, live, output, "/".join(sorted(r for r in reasons if r)), now)
        events.append((live.channel, "done", request_id, output))

    def _abort(self, request_id: str, reason: str) -> RequestOutput | None:
        live = self._live.pop(request_id, None)
        if live is None:
            return None  # already finished (the abort crossed the final delta) or never added
        output = self.engine.request_output(request_id)
        self.engine.abort(request_id)
        self._record(request_id, live, output, reason, time.monotonic())
        return output

    def _stop(self, events: list) -> None:
        """Shutdown: whatever the HTTP side has not finished or aborted by now is aborted."""
        for request_id in list(self._live):
            channel = self._live[request_id].channel
            self._abort(request_id, "abort")
            events.append((channel, "error", request_id, EngineDeadError("the server is shutting down")))
        if self.observer is not None:
            self.observer.on_loop(self.engine, self._prompt_tokens_added)
        self.engine.close()

    def _die(self, exc: BaseException) -> None:
        with self._lock:
            self._error = exc
        error = EngineDeadError(f"the engine loop stopped: {type(exc).__name__}: {exc}")
        events = [(live.channel, "error", rid, error) for rid, live in self._live.items()]
        self._live.clear()
        self._deliver(events)
        self._fail_inbox(error)
        try:  # stops what runs beside the engine (tensor-parallel ranks, disk writes): it will not step again
            self.engine.close()
        except Exception:  # noqa: BLE001 - the loop is dead either way; the log says why this failed too
            logger.exception("closing the dead engine failed")

    def _fail_inbox(self, error: Exception) -> None:
        events = []
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                events.append((payload[0], "rejected", "", error))
            elif kind == "inspect":
                payload[1].set_exception(error)
        self._deliver(events)

    # ------------------------------------------------------------------ logging

    def _record(self, request_id: str, live: _Live, output: RequestOutput, reason: str, now: float) -> None:
        """The request's log line and metrics. Never raises: it runs after the request left `_live` and before
        its last event is queued, so an exception here would leave its client waiting for an end."""
        try:
            self._log_and_count(request_id, live, output, reason, now)
        except Exception:  # noqa: BLE001 - bookkeeping must never cost a client its answer
            logger.exception("recording request %s failed", request_id)

    def _log_and_count(self, request_id: str, live: _Live, output: RequestOutput, reason: str, now: float) -> None:
        record = RequestRecord(
            request_id=request_id,
            num_prompt_tokens=live.num_prompt_tokens,
            num_cached_tokens=output.num_cached_tokens,
            num_output_tokens=sum(len(o.token_ids) for o in output.outputs),
            arrival_time=live.arrival_time,
            first_token_time=live.first_token_time,
            finish_time=now,
            finish_reason=reason or "abort",
            inter_token_latencies=live.inter_token_latencies,
        )
        log_request(record)
        if self.observer is not None:
            self.observer.on_request_done(record)
