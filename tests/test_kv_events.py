"""KV cache events (issue 18): vLLM's wire format, what the engine and its tiers publish, replay, and a
publisher that never holds the engine up.

Engine tests use a tiny random llama (3 layers, 2 KV heads x 16: 12,288 B per 16-token fp32 block), so a
pool of a few blocks evicts; a subscriber rebuilds each medium's block set from the events alone and
must end equal to what the pool and the tiers hold.
"""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import torch
import zmq
from helpers import TINY_LLAMA_BLOCK_BYTES as BLOCK_BYTES
from helpers import save_tiny_model

from kvserve import LLM, SamplingParams
from kvserve.kv.events import (
    END_OF_REPLAY,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventLog,
    KVEventPublisher,
    decode_batch,
    replay_endpoint_for,
)

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(str(folder), "llama")
    return str(folder)


def prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (length,), generator=g).tolist() for _ in range(count)]


class Subscriber:
    """A consumer as vLLM's example writes one: SUB for the stream, DEALER (REQ's framing) for replay."""

    def __init__(self, publisher: KVEventPublisher) -> None:
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
        self.sub.connect(publisher.endpoint)
        self.replay_socket = self.context.socket(zmq.DEALER)
        self.replay_socket.connect(publisher.replay_endpoint)
        time.sleep(0.3)  # PUB/SUB: a subscription takes a moment to reach the publisher

    def receive(self, timeout_s: float = 2.0) -> list[tuple[int, bytes]]:
        """Every batch that arrives until the stream stays quiet for `timeout_s`."""
        out = []
        while self.sub.poll(int(timeout_s * 1000)):
            topic, seq, payload = self.sub.recv_multipart()
            assert topic == b"kv-events"
            out.append((int.from_bytes(seq, "big"), payload))
        return out

    def replay(self, start: int) -> list[tuple[int, bytes]]:
        self.replay_socket.send_multipart((b"", start.to_bytes(8, "big")))
        out = []
        while self.replay_socket.poll(5000):
            _, seq, payload = self.replay_socket.recv_multipart()
            if seq == END_OF_REPLAY:
                assert payload == b""
                return out
            out.append((int.from_bytes(seq, "big"), payload))
        raise AssertionError("the replay never ended")

    def close(self) -> None:
        self.context.destroy(linger=0)


def apply(batches: list[tuple[int, bytes]]) -> dict[str, set[bytes]]:
    """Each medium's blocks, from the events alone."""
    held: dict[str, set[bytes]] = {}
    for _, payload in sorted(batches):
        for event in decode_batch(payload).events:
            if isinstance(event, AllBlocksCleared):
                held.clear()
            elif isinstance(event, BlockStored):
                held.setdefault(event.medium, set()).update(event.block_hashes)
            else:
                held.setdefault(event.medium, set()).difference_update(event.block_hashes)
    return held


# ---------------------------------------------------------------- the wire format


def test_the_wire_format_is_vllms_array_layout():
    """vLLM's consumers decode KVEventBatch = [ts, [event...]] with each event [tag, field...] in its field
    order (msgspec array_like, tag=True): pinned here on the raw msgpack, not through our own types."""
    log = KVEventLog(block_size=16)
    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    log.cleared()
    log.stored(a, None, tuple(range(16)), "device")
    log.stored(b, a, tuple(range(16, 32)), "device")  # continues the run: merged
    log.stored(c, None, tuple(range(16)), "host")
    log.removed([a], "device")
    log.removed([b], "device")  # merged
    events = log.take()
    assert log.take() == []
    payload = msgspec.msgpack.encode(EventBatch(0.0, events))
    raw = msgspec.msgpack.decode(payload)
    assert raw == [
        0.0,
        [
            ["AllBlocksCleared"],
            ["BlockStored", [a, b], None, list(range(32)), 16, None, "device"],
            ["BlockStored", [c], None, list(range(16)), 16, None, "host"],
            ["BlockRemoved", [a, b], "device"],
        ],
        None,  # data_parallel_rank: array-like structs keep their trailing defaults (vLLM's do too)
    ]
    assert decode_batch(payload).events == events


def test_replay_endpoint_defaults_to_the_next_port():
    assert replay_endpoint_for("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5558"
    assert replay_endpoint_for("tcp://*:*") == "tcp://*:*"
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        replay_endpoint_for("ipc:///tmp/events")


def test_a_taken_port_is_a_clear_error_at_start():
    first = KVEventPublisher("tcp://127.0.0.1:*")
    try:
        with pytest.raises(ValueError, match="cannot publish KV events"):
            KVEventPublisher(first.endpoint, "tcp://127.0.0.1:*")
    finally:
        first.close()


# ---------------------------------------------------------------- publishing and replay


def test_replay_returns_the_batches_after_a_missed_sequence_number():
    publisher = KVEventPublisher("tcp://127.0.0.1:*")
    subscriber = Subscriber(publisher)
    try:
        for i in range(5):
            publisher.publish([BlockRemoved([bytes([i]) * 32], "device")])
        live = subscriber.receive(timeout_s=1.0)
        assert [seq for seq, _ in live] == [0, 1, 2, 3, 4]
        # a consumer that lost 2 and 3 asks from 2 on: it gets exactly those batches again, then the rest
        assert subscriber.replay(2) == live[2:]
        assert subscriber.replay(99) == []
    finally:
        subscriber.close()
        publisher.close()


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    publisher = KVEventPublisher("tcp://127.0.0.1:*", max_queue_batches=2)
    release = threading.Event()
    send = publisher._send
    publisher._send = lambda *a: (release.wait(), send(*a))  # a publisher thread stuck on its first batch
    try:
        started = time.monotonic()
        for i in range(10):
            publisher.publish([BlockRemoved([bytes([i]) * 32], "device")])
        assert time.monotonic() - started < 0.5
        assert 7 <= publisher.num_dropped <= 8  # 2 queued, 1 taken by the stuck thread (if it got there)
    finally:
        release.set()
        publisher.close()
    assert publisher.num_published + publisher.num_dropped == 10


# ---------------------------------------------------------------- the engine's events


def test_engine_events_track_the_pool_through_caching_and_eviction(tiny):
    llm = LLM(tiny, kv_cache_memory=12 * BLOCK_BYTES, max_model_len=128, kv_events_endpoint="tcp://127.0.0.1:*")
    engine = llm.engine
    subscriber = Subscriber(engine.kv_events)
    try:
        first = prompts(1, 40)  # 2 full blocks + 8 tokens
        llm.generate(first, GREEDY)
        batches = subscriber.receive(timeout_s=1.0)
        # the opening batch went out before the subscriber connected: replay has it
        batches = subscriber.replay(0)
        decoded = [decode_batch(p) for _, p in batches]
        assert isinstance(decoded[0].events[0], AllBlocksCleared)
        stored = [e for d in decoded for e in d.events if isinstance(e, BlockStored)]
        request = [h for e in stored for h in e.block_hashes]
        assert set(request) == set(engine.kv.pool.cached)
        assert stored[0].parent_block_hash is None and stored[0].medium == "device" and stored[0].block_size == 16
        assert [t for e in stored for t in e.token_ids] == first[0][:32]
        # 6 prompts of 3 blocks each through a 12-block pool: the first prompt's blocks are evicted
        llm.generate(prompts(6, 50, seed=1), GREEDY)
        batches += subscriber.receive(timeout_s=1.0)
        removed = {
            h for _, p in batches for e in decode_batch(p).events if isinstance(e, BlockRemoved) for h in e.block_hashes
        }
        assert set(request) <= removed
        assert apply(batches) == {"device": set(engine.kv.pool.cached)}
        assert [seq for seq, _ in sorted(batches)] == list(range(len(batches)))  # no gap, no duplicate
    finally:
        subscriber.close()
        engine.close()


def test_tier_events_follow_blocks_down_to_host_and_disk(tiny, tmp_path):
    llm = LLM(
        tiny,
        kv_cache_memory=12 * BLOCK_BYTES,
        kv_offload_memory=4 * BLOCK_BYTES,
        kv_offload_dir=str(tmp_path),
        kv_offload_disk=400 * (BLOCK_BYTES + 4096),
        max_model_len=128,
        kv_events_endpoint="tcp://127.0.0.1:*",
    )
    engine = llm.engine
    subscriber = Subscriber(engine.kv_events)
    try:
        llm.generate(prompts(8, 50, seed=2), GREEDY)
        engine.kv.offload.close()  # the disk writes are done: nothing changes under the comparison
        subscriber.receive(timeout_s=1.0)
        held = apply(subscriber.replay(0))
        tiers = {t.name: set(t.block_hashes()) for t in engine.kv.offload.tiers}
        assert held == {"device": set(engine.kv.pool.cached), **tiers}
        assert len(tiers["host"]) == 4 and len(tiers["disk"]) == 8 * 3
    finally:
        subscriber.close()


def test_a_restarted_engine_announces_the_disk_tier_it_finds(tiny, tmp_path):
    kw = dict(kv_cache_memory=12 * BLOCK_BYTES, kv_offload_dir=str(tmp_path), max_model_len=128)
    first = LLM(tiny, kv_offload_disk=400 * (BLOCK_BYTES + 4096), **kw)
    first.generate(prompts(2, 50, seed=3), GREEDY)
    first.engine.close()
    second = LLM(tiny, kv_offload_disk=400 * (BLOCK_BYTES + 4096), kv_events_endpoint="tcp://127.0.0.1:*", **kw)
    subscriber = Subscriber(second.engine.kv_events)
    try:
        opening = decode_batch(subscriber.replay(0)[0][1]).events
        assert isinstance(opening[0], AllBlocksCleared)
        announced = [e for e in opening[1:] if isinstance(e, BlockStored)]
        assert {e.medium for e in announced} == {"disk"}
        assert {h for e in announced for h in e.block_hashes} == set(second.engine.kv.offload.disk.block_hashes())
        assert sum(len(e.token_ids) for e in announced) == 6 * 16  # read back from the files' headers
    finally:
        subscriber.close()
        second.engine.close()


def test_a_subscriber_that_never_reads_does_not_slow_generation(tiny):
    llm = LLM(tiny, kv_cache_memory=12 * BLOCK_BYTES, max_model_len=128, kv_events_endpoint="tcp://127.0.0.1:*")
    context = zmq.Context()
    stuck = context.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(llm.engine.kv_events.endpoint)
    try:
        work = prompts(16, 50, seed=4)
        outputs = llm.generate(work, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
        llm.engine.close()  # sends what is queued; a publisher stuck on the subscriber would hang here
        assert llm.engine.kv_events.num_published >= 5 and llm.engine.kv_events.num_dropped == 0
    finally:
        context.destroy(linger=0)


def test_config_refuses_events_without_the_prefix_cache():
    with pytest.raises(ValueError, match="prefix caching"):
        LLM(kv_events_endpoint="tcp://127.0.0.1:*", enable_prefix_caching=False)
    with pytest.raises(ValueError, match="needs kv_events_endpoint"):
        LLM(kv_events_replay_endpoint="tcp://127.0.0.1:*")
