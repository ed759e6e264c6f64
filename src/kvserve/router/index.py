"""KVIndex: which blocks each worker's prefix cache holds, kept from the workers' KV events.

Each worker has one EventSubscriber thread: a SUB socket on its events and a DEALER on its replay
socket (kv/events.py). On connect it asks the replay socket for everything from sequence 0, so it
starts from the worker's opening AllBlocksCleared and every batch since (as far as the worker's replay
buffer reaches); later, a gap in the sequence numbers is filled from the replay socket. A gap the
buffer no longer covers leaves the worker's index incomplete: it is counted (`num_resyncs`), and the
index then under-reports that worker's blocks, which costs cache hits, never correctness (the worker
computes what the router thought it lacked).

The index answers one question per request: how many of the request's leading blocks (its prefix-hash
chain) does each worker hold, in any medium (device, host, disk: a lower tier's block is loaded back,
far cheaper than computing it)?
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from kvserve.kv.events import END_OF_REPLAY, AllBlocksCleared, BlockStored, KVEventBatch, decode_batch

logger = logging.getLogger("kvserve.router")


class KVIndex:
    """worker URL -> medium -> block hashes. Thread-safe: subscriber threads write, the router's loop reads."""

    def __init__(self) -> None:
        self._blocks: dict[str, dict[str, set[bytes]]] = {}
        self._lock = threading.Lock()

    def apply(self, worker: str, batch: KVEventBatch) -> None:
        with self._lock:
            media = self._blocks.setdefault(worker, {})
            for event in batch.events:
                if isinstance(event, AllBlocksCleared):
                    media.clear()
                elif isinstance(event, BlockStored):
                    media.setdefault(event.medium, set()).update(event.block_hashes)
                else:
                    media.setdefault(event.medium, set()).difference_update(event.block_hashes)

    def clear(self, worker: str) -> None:
        with self._lock:
            self._blocks.pop(worker, None)

    def matched_blocks(self, worker: str, hashes: Iterable[bytes]) -> int:
        """How many of `hashes` (a prefix chain, in order) the worker holds before the first it lacks."""
        with self._lock:
            media = list(self._blocks.get(worker, {}).values())
            count = 0
            for block_hash in hashes:
                if not any(block_hash in held for held in media):
                    break
                count += 1
            return count

    def snapshot(self, worker: str) -> dict[str, set[bytes]]:
        """A copy of what the index holds for `worker`, per medium (empty media left out)."""
        with self._lock:
            return {medium: set(held) for medium, held in self._blocks.get(worker, {}).items() if held}


class EventSubscriber:
    """Follows one worker's KV events into the index, on a daemon thread, until stop()."""

    def __init__(self, worker: str, endpoint: str, replay_endpoint: str, topic: str, index: KVIndex) -> None:
        self.worker = worker
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.index = index
        self.last_seq = -1  # the newest batch applied
        self.num_batches = 0
        self.num_resyncs = 0  # gaps the worker's replay buffer could not fill
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kvserve-router-events-{worker}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Returns at once; the thread sees the flag within its 100 ms poll and closes its sockets."""
        self._stop.set()

    def _run(self) -> None:
        import zmq

        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(self.endpoint)
        replay = context.socket(zmq.DEALER)
        replay.setsockopt(zmq.LINGER, 0)
        replay.connect(self.replay_endpoint)
        try:
            self._catch_up(replay, until=None)  # everything the worker published before we subscribed
            while not self._stop.is_set():
                if not sub.poll(100):
                    continue
                topic, seq_bytes, payload = sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big")
                if seq <= self.last_seq:
                    continue  # already applied (from the replay)
                if seq > self.last_seq + 1:
                    self._catch_up(replay, until=seq)
                self._apply(seq, payload)
        except Exception:  # noqa: BLE001 - the index of this worker goes stale; routing still works
            logger.exception("KV event subscriber of %s stopped", self.worker)
        finally:
            context.destroy(linger=0)

    def _catch_up(self, replay, until: int | None) -> None:
        """Applies the batches after last_seq (and before `until`) from the replay socket."""
        replay.send_multipart((b"", (self.last_seq + 1).to_bytes(8, "big")))
        expected = self.last_seq + 1
        while replay.poll(5000):
            _, seq_bytes, payload = replay.recv_multipart()
            if seq_bytes == END_OF_REPLAY:
                return
            seq = int.from_bytes(seq_bytes, "big")
            if until is not None and seq >= until:
                continue
            if seq > expected:
                self.num_resyncs += 1
                logger.warning(
                    "KV events of %s: batches %d-%d are gone; its index is incomplete", self.worker, expected, seq - 1
                )
            self._apply(seq, payload)
            expected = seq + 1
        logger.warning("KV events of %s: the replay socket did not answer", self.worker)

    def _apply(self, seq: int, payload: bytes) -> None:
        self.index.apply(self.worker, decode_batch(payload))
        self.last_seq = seq
        self.num_batches += 1
