"""KV cache events: what the prefix cache holds, published for routers and indexers.

The schema and the wire format are vLLM's (`--kv-events-config`), so that a consumer written for vLLM
(llm-d's indexer, Dynamo's KV router, vLLM's example subscriber) reads kvserve's events unchanged:
- a ZMQ PUB socket sends each batch as three frames: topic, sequence number (8 bytes, big-endian),
  and the batch as msgpack: KVEventBatch = [ts, [event, ...]] (array-like, tagged structs);
- a ZMQ ROUTER "replay" socket takes a request of one frame, a sequence number (with REQ's empty
  delimiter frame), and answers with every buffered batch from that number on, one
  [seq, payload] message each, then [-1, b""] as the end.

Events, with the medium that holds the block ("device", "host", "disk"):
- BlockStored: blocks entered that medium's cache: their hashes (kv/prefix_hash.py's chain), the
  hash before the first (None for a prompt's first block, and on the lower tiers, which do not know
  it), their token ids, the block size;
- BlockRemoved: blocks left that medium (evicted; for the device, handed to its next owner);
- AllBlocksCleared: the publisher started: whatever a consumer knew of this engine is void.

Events are gathered in a KVEventLog while the engine steps and published once per step.
Publishing never blocks the engine: batches go through a bounded queue to the publisher's own
thread (a full queue drops the batch and counts it), and ZMQ's PUB socket itself drops what a
slow subscriber does not take (its high-water mark) rather than waiting for it. A consumer sees a
gap in the sequence numbers and asks the replay socket for what it missed.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import deque
from typing import Any

import msgspec

logger = logging.getLogger(__name__)

MEDIUM_DEVICE = "device"
MEDIUM_HOST = "host"
MEDIUM_DISK = "disk"

DEFAULT_TOPIC = "kv-events"
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


# ---------------------------------------------------------------- the schema (vLLM's field names and order)


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the events; encoded as ["BlockStored", field, ...]."""


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def decode_batch(payload: bytes) -> KVEventBatch:
    return _DECODER.decode(payload)


_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


# ---------------------------------------------------------------- gathering events during a step


class KVEventLog:
    """The events since the last take(). Consecutive events of one kind and medium merge: a request's run of
    newly cached blocks is one BlockStored whose parent is the block before the run, as in vLLM. Thread-safe
    (the disk tier's writer thread reports the blocks it drops)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._events: list[KVCacheEvent] = []
        self._lock = threading.Lock()

    def stored(self, block_hash: bytes, parent: bytes | None, token_ids: tuple[int, ...], medium: str) -> None:
        with self._lock:
            last = self._events[-1] if self._events else None
            if (
                isinstance(last, BlockStored)
                and last.medium == medium
                and parent is not None
                and last.block_hashes[-1] == parent
            ):
                last.block_hashes.append(block_hash)
                last.token_ids.extend(token_ids)
                return
            self._events.append(BlockStored([block_hash], parent, list(token_ids), self.block_size, None, medium))

    def removed(self, block_hashes: list[bytes], medium: str) -> None:
        if not block_hashes:
            return
        with self._lock:
            last = self._events[-1] if self._events else None
            if isinstance(last, BlockRemoved) and last.medium == medium:
                last.block_hashes.extend(block_hashes)
                return
            self._events.append(BlockRemoved(list(block_hashes), medium))

    def cleared(self) -> None:
        with self._lock:
            self._events.append(AllBlocksCleared())

    def take(self) -> list[KVCacheEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events


# ---------------------------------------------------------------- publishing


def replay_endpoint_for(endpoint: str) -> str:
    """The replay socket's default address: the next port on the same interface (tcp://h:5557 ->
    tcp://h:5558); an ephemeral publisher port (tcp://h:*) gets an ephemeral replay port."""
    match = re.fullmatch(r"(tcp://.+):(\d+|\*)", endpoint)
    if match is None:
        raise ValueError(f"kv_events_endpoint {endpoint!r}: give tcp://HOST:PORT, or a replay endpoint of its own")
    host, port = match.groups()
    return f"{host}:{'*' if port == '*' else int(port) + 1}"


class KVEventPublisher:
    """ZMQ PUB (+ ROUTER replay) on a thread of its own. publish() only enqueues; the thread numbers,
    encodes, sends and buffers the batches (the last `buffer_batches` for replay).

    Construction binds both sockets and raises ValueError when it cannot (a port in use, a bad address),
    so a misconfigured server fails at start-up. `endpoint` / `replay_endpoint` are then the bound
    addresses (an ephemeral port "*" resolved)."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        topic: str = DEFAULT_TOPIC,
        max_queue_batches: int = 10_000,
        buffer_batches: int = 10_000,
        data_parallel_rank: int | None = None,
    ) -> None:
        import zmq  # only a server with events on needs it

        self.topic = topic.encode()
        self.data_parallel_rank = data_parallel_rank
        self.num_published = 0  # batches sent
        self.num_dropped = 0  # batches dropped because the queue was full (the engine never waits)
        self._queue: queue.Queue[tuple[float, list[KVCacheEvent]] | None] = queue.Queue(max_queue_batches)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self._encoder = msgspec.msgpack.Encoder()
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._replay = self._context.socket(zmq.ROUTER)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)  # per subscriber; past it ZMQ drops for that subscriber
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay.setsockopt(zmq.LINGER, 0)
        try:
            self._pub.bind(endpoint)
            self._replay.bind(replay_endpoint or replay_endpoint_for(endpoint))
        except zmq.ZMQError as exc:
            self._pub.close()
            self._replay.close()
            self._context.term()
            raise ValueError(f"cannot publish KV events on {endpoint!r}: {exc}") from None
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._next_seq = 0
        # The sockets now belong to the thread (ZMQ sockets may move between threads across a barrier:
        # Thread.start() is one); this thread never touches them again.
        self._thread = threading.Thread(target=self._run, name="kvserve-kv-events", daemon=True)
        self._thread.start()
        logger.info("KV events on %s (replay on %s)", self.endpoint, self.replay_endpoint)

    def publish(self, events: list[KVCacheEvent]) -> None:
        """Queues one batch (never blocks; a full queue drops it and counts it)."""
        if not events:
            return
        try:
            self._queue.put_nowait((time.time(), events))
        except queue.Full:
            self.num_dropped += 1

    def close(self) -> None:
        """Sends what is queued, then stops the thread and closes the sockets."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)

    # ---- the publisher thread

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._replay, zmq.POLLIN)
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.01)
                except queue.Empty:
                    item = ()
                if item is None:
                    break
                if item:
                    self._send(*item)
                if poller.poll(0):
                    self._answer_replay()
        except Exception:  # noqa: BLE001 - a publisher failure must not take the engine down with it
            logger.exception("the KV event publisher stopped")
        finally:
            self._pub.close()
            self._replay.close()
            self._context.term()

    def _send(self, ts: float, events: list[KVCacheEvent]) -> None:
        payload = self._encoder.encode(EventBatch(ts, events, self.data_parallel_rank))
        seq = self._next_seq
        self._next_seq += 1
        self._buffer.append((seq, payload))
        self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload), copy=False)
        self.num_published += 1

    def _answer_replay(self) -> None:
        import zmq

        while True:
            try:
                frames = self._replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[2]) != 8:  # [client id, b"", start seq]
                logger.warning("ignoring a malformed KV event replay request (%d frames)", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in self._buffer:
                if seq >= start_seq:
                    self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            self._replay.send_multipart((client, b"", END_OF_REPLAY, b""))
