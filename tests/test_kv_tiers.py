"""Tiered KV cache: block rows, the host and disk tiers, and the engine with them (issue 7).

Unit tests pin exact layouts, LRU order and corruption handling; engine tests use a tiny random
llama (3 layers, 2 KV heads x 16: 12,288 B per 16-token block in fp32) so that pools of a few
blocks force evictions through every tier; one test restarts a real server process on the
default model and serves a long prefix from the disk tier.
"""

from __future__ import annotations

import hashlib
import logging
import os

import httpx
import pytest
import torch
from helpers import TINY_LLAMA_BLOCK_BYTES as BLOCK_BYTES
from helpers import random_prompts as prompts
from helpers import save_tiny_model, tiered_llm
from prometheus_client.parser import text_string_to_metric_families

from kvserve import LLM, SamplingParams
from kvserve.kv.block_io import BlockIO
from kvserve.kv.prefix_hash import extend_block_hashes
from kvserve.kv.quant import QuantizedKVCache, as_bytes
from kvserve.kv.tiers import _HEADER, DiskTier, HostTier


def h(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def row(seed: int, nbytes: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


TOKENS = (5, 6, 7, 8)
FILE_BYTES = _HEADER.size + 4 * len(TOKENS) + 64


def files(folder) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if f.endswith(".kvb"))


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_block_io_round_trips_plain_quantized_and_latent_caches(kv_cache_dtype):
    torch.manual_seed(0)
    plain = torch.randn(2, 6, 4, 2, 8)  # [K/V, blocks, block size, heads, dim]
    quant = QuantizedKVCache.allocate(kv_cache_dtype, 6, 4, 2, 8, 1, torch.float32, torch.device("cpu"))
    quant.data.copy_(torch.randint(-127, 128, quant.data.shape))  # fp8 codes move as bytes (as_bytes)
    quant.key_params.uniform_()
    quant.value_scales.uniform_()
    latent = torch.randn(1, 6, 4, 12)  # MLA: [1, blocks, block size, width]
    io = BlockIO([plain, quant, latent])
    # plain K/V + int8 codes + K scale and center per channel + V scale per token + latent
    assert io.row_nbytes == 2 * 4 * 2 * 8 * 4 + 2 * 4 * 2 * 8 + 2 * 2 * 8 * 4 + 4 * 2 * 4 + 4 * 12 * 4 == 992
    tensors = (plain, as_bytes(quant.data), quant.key_params, quant.value_scales, latent)
    before = [t.clone() for t in tensors]
    rows = io.gather([3, 1])
    assert rows.shape == (2, 992) and rows.dtype == torch.uint8
    io.scatter([0, 5], rows)
    for t, old in zip(tensors, before):
        assert torch.equal(t[:, 0], old[:, 3]) and torch.equal(t[:, 5], old[:, 1])
        assert torch.equal(t[:, 1:5], old[:, 1:5])  # nothing else touched


# ---------------------------------------------------------------- disk tier


def test_disk_tier_round_trip_restart_and_lru_eviction(tmp_path):
    tier = DiskTier(str(tmp_path), capacity_bytes=3 * FILE_BYTES, row_nbytes=64)
    for i in range(3):
        tier.store(h(f"b{i}"), TOKENS, row(i))
    assert torch.equal(tier.load(h("b0"), TOKENS), row(0))  # served from memory or file, same bytes
    tier.close()
    assert len(files(tmp_path)) == 3

    again = DiskTier(str(tmp_path), capacity_bytes=3 * FILE_BYTES, row_nbytes=64)  # a restart
    assert again.used_bytes == 3 * FILE_BYTES
    assert all(again.contains(h(f"b{i}"), TOKENS) for i in range(3))
    assert torch.equal(again.load(h("b1"), TOKENS), row(1))
    assert again.load(h("b1"), (5, 6, 7, 9)) is None  # other tokens under the same hash: a miss
    again.load(h("b0"), TOKENS)  # LRU order is now b2, b1, b0
    again.store(h("b3"), TOKENS, row(3))
    again.close()
    assert not again.contains(h("b2"), TOKENS) and again.stats.evictions == 1
    assert again.used_bytes == 3 * FILE_BYTES
    assert [os.path.basename(f) for f in files(tmp_path)] == sorted(f"{h(f'b{i}').hex()}.kvb" for i in (0, 1, 3))
    assert sum(os.path.getsize(f) for f in files(tmp_path)) <= again.capacity_bytes


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_disk_tier_damaged_file_is_a_warned_miss(tmp_path, caplog, damage):
    tier = DiskTier(str(tmp_path), capacity_bytes=10 * FILE_BYTES, row_nbytes=64)
    tier.store(h("a"), TOKENS, row(1))
    tier.store(h("b"), TOKENS, row(2))
    tier.close()
    (path,) = [f for f in files(tmp_path) if h("a").hex() in f]
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[-10] ^= 0xFF
    elif damage == "truncate":
        data = data[:-7]
    else:
        data = bytearray()
    open(path, "wb").write(bytes(data))

    tier = DiskTier(str(tmp_path), capacity_bytes=10 * FILE_BYTES, row_nbytes=64)
    assert tier.contains(h("a"), TOKENS)  # the index cannot know yet
    with caplog.at_level(logging.WARNING, logger="kvserve.kv.tiers"):
        assert tier.load(h("a"), TOKENS) is None
    assert "unusable" in caplog.text and tier.stats.corrupt == 1
    assert not tier.contains(h("a"), TOKENS)
    assert torch.equal(tier.load(h("b"), TOKENS), row(2))  # the others are unaffected
    tier.close()
    assert not os.path.exists(path)


# ---------------------------------------------------------------- host tier


def test_host_tier_lru_hands_evicted_blocks_to_the_disk(tmp_path):
    disk = DiskTier(str(tmp_path), capacity_bytes=10 * FILE_BYTES, row_nbytes=64)
    host = HostTier(capacity_bytes=2 * 64 + 10, row_nbytes=64, pin_memory=False)
    host.next_tier = disk
    assert host.capacity_bytes == 128
    host.store(h("a"), TOKENS, row(1))
    host.store(h("b"), TOKENS, row(2))
    assert torch.equal(host.load(h("a"), TOKENS), row(1))  # a is now the most recent
    host.store(h("c"), TOKENS, row(3))  # evicts b, the least recently used, into the disk tier
    assert list(host.index) == [h("a"), h("c")] and host.stats.evictions == 1
    assert disk.contains(h("b"), TOKENS) and torch.equal(disk.load(h("b"), TOKENS), row(2))
    assert not disk.contains(h("a"), TOKENS)
    disk.close()
    with pytest.raises(ValueError, match="holds no KV block"):
        HostTier(capacity_bytes=63, row_nbytes=64, pin_memory=False)


# ---------------------------------------------------------------- the engine with tiers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(str(folder), "llama")
    other = tmp_path_factory.mktemp("tiny-llama-other")
    save_tiny_model(str(other), "llama", seed=1)
    return str(folder), str(other)


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_working_set_beyond_the_device_pool_comes_back_from_host_and_disk(tiny, tmp_path):
    llm = tiered_llm(tiny[0], tmp_path, device_blocks=16, host_blocks=12)
    work = prompts(6, 96)  # 6 blocks each: 36 > 16 device blocks; host + disk hold them all
    first = llm.generate(work, GREEDY)
    assert llm.get_stats()["prefix_cache_hits"] == 0
    # newest first, so each tier is reached: the device still holds the last prompts, the host
    # the ones evicted last, the disk (written through) everything
    second = llm.generate(work[::-1], GREEDY)[::-1]
    stats = llm.get_stats()
    assert [o.outputs[0].token_ids for o in second] == [o.outputs[0].token_ids for o in first]
    assert [o.num_cached_tokens for o in second] == [80] * 6  # (96 - 1) // 16 blocks of each prompt
    assert stats["prefix_cache_hits"] == 480
    assert (stats["kv_offload_host_hit_tokens"], stats["kv_offload_disk_hit_tokens"]) == (80, 240)  # device: 160
    assert stats["kv_offload_host_bytes_out"] == stats["kv_offload_host_hit_tokens"] // 16 * BLOCK_BYTES
    assert stats["kv_offload_host_used_bytes"] == 12 * BLOCK_BYTES
    llm.engine.check_idle()
    llm.engine.close()


def test_disk_tier_survives_restart_and_never_mixes_models_or_kv_dtypes(tiny, tmp_path):
    model, other_model = tiny
    work = prompts(2, 70, seed=3)
    llm = tiered_llm(model, tmp_path, device_blocks=32, host_blocks=None)
    first = llm.generate(work, GREEDY)
    llm.engine.close()

    for name, kw in (("other weights", dict(model=other_model)), ("int8 KV", dict(kv_cache_dtype="int8"))):
        stranger = tiered_llm(kw.pop("model", model), tmp_path, device_blocks=32, host_blocks=None, **kw)
        stranger.generate(work, GREEDY)
        assert stranger.get_stats()["prefix_cache_hits"] == 0, name
        stranger.engine.close()

    restarted = tiered_llm(model, tmp_path, device_blocks=32, host_blocks=None)
    again = restarted.generate(work, GREEDY)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    assert [o.num_cached_tokens for o in again] == [64, 64]
    assert restarted.get_stats()["kv_offload_disk_hit_tokens"] == 128
    restarted.engine.close()


def test_corrupt_disk_block_is_recomputed_with_a_warning(tiny, tmp_path, caplog):
    model = tiny[0]
    (prompt,) = prompts(1, 70, seed=4)
    llm = tiered_llm(model, tmp_path, device_blocks=32, host_blocks=None)
    (first,) = llm.generate([prompt], GREEDY)
    llm.engine.close()
    hashes: list[bytes] = []
    extend_block_hashes(hashes, llm.engine.kv.root_hash, lambda a, b: prompt[a:b], len(prompt), 16)
    path = llm.engine.kv.offload.disk.path(hashes[2])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x55
    open(path, "wb").write(bytes(data))

    restarted = tiered_llm(model, tmp_path, device_blocks=32, host_blocks=None)
    with caplog.at_level(logging.WARNING, logger="kvserve.kv.tiers"):
        (again,) = restarted.generate([prompt], GREEDY)
    assert "checksum mismatch" in caplog.text
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.num_cached_tokens == 32  # blocks 0 and 1; block 2 and the rest were computed
    stats = restarted.get_stats()
    assert stats["kv_offload_disk_corrupt"] == 1 and stats["kv_offload_disk_hit_tokens"] == 32
    restarted.engine.check_idle()
    restarted.engine.close()


def test_full_disk_tier_evicts_and_stays_under_its_size(tiny, tmp_path):
    limit = 5 * (BLOCK_BYTES + _HEADER.size + 64)
    llm = LLM(
        tiny[0],
        kv_cache_memory=64 * BLOCK_BYTES,
        kv_offload_dir=str(tmp_path),
        kv_offload_disk=limit,
        max_model_len=128,
    )
    llm.generate(prompts(4, 100, seed=5), GREEDY)  # 24 full blocks computed, 5 fit
    llm.engine.close()
    disk = llm.get_stats()
    assert disk["kv_offload_disk_used_bytes"] <= limit and disk["kv_offload_disk_evictions"] > 0
    assert len(files(tmp_path)) == 5
    assert sum(os.path.getsize(f) for f in files(tmp_path)) <= limit


def test_offload_flags_are_validated(tmp_path):
    with pytest.raises(ValueError, match="needs both"):
        LLM(kv_offload_dir=str(tmp_path))
    with pytest.raises(ValueError, match="prefix caching"):
        LLM(kv_offload_memory="1GiB", enable_prefix_caching=False)
    with pytest.raises(ValueError, match="invalid size"):
        LLM(kv_offload_memory="lots")


# ---------------------------------------------------------------- a restarted server


def test_restarted_server_serves_a_long_prefix_from_disk(tmp_path):
    from kvserve.server.launch import ServerProcess

    args = ["--kv-cache-memory", "64MiB", "--max-model-len", "1024", "--log-stats-interval", "0"]
    args += ["--kv-offload-dir", str(tmp_path), "--kv-offload-disk", "1GiB", "--served-model-name", "x"]
    text = open(os.path.join(os.path.dirname(__file__), "data", "english_text.txt")).read()[:2400]
    body = {"model": "x", "prompt": text, "max_tokens": 12, "temperature": 0}

    def serve_once() -> tuple[dict, str]:
        server = ServerProcess(args).start()
        try:
            response = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
            metrics = httpx.get(server.url + "/metrics").text
        finally:
            assert server.stop() == 0, server.output()[-3000:]
        return response, metrics

    first, _ = serve_once()
    second, metrics = serve_once()
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert prompt_tokens > 400
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert (first["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    cached = (prompt_tokens - 1) // 16 * 16
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    disk_hits = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "kvserve:kv_offload_hits_total" and sample.labels["tier"] == "disk"
    ]
    assert disk_hits == [cached]


def test_disk_tier_that_cannot_write_turns_itself_off_and_serving_goes_on(tiny, tmp_path, caplog, monkeypatch):
    """The disk fills up mid-run: one warning, the tier holds and finds nothing more, the engine
    computes instead, and the answers do not change."""
    import kvserve.kv.tiers as tiers

    llm = tiered_llm(tiny[0], tmp_path, device_blocks=16, host_blocks=None)
    work = prompts(4, 70, seed=5)
    first = llm.generate(work[:2], GREEDY)
    disk = llm.engine.kv.offload.disk
    llm.engine.kv.offload.flush()
    disk._writer.submit(lambda: None).result()  # the writes so far are done
    assert disk.used_bytes > 0 and disk.off_reason is None

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiers.os, "replace", full)
    with caplog.at_level(logging.WARNING, logger="kvserve.kv.tiers"):
        more = llm.generate(work[2:], GREEDY)
        disk._writer.submit(lambda: None).result()
        again = llm.generate(work, GREEDY)
    assert caplog.text.count("turned off") == 1 and "No space left" in disk.off_reason
    assert disk.used_bytes == 0 and not disk.index
    reference = LLM(tiny[0], kv_cache_memory=64 * BLOCK_BYTES, max_model_len=128).generate(work, GREEDY)
    answers = [o.outputs[0].token_ids for o in first + more]
    assert answers == [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in reference]
    llm.engine.check_idle()
    llm.engine.close()
