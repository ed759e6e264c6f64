"""Quantized KV cache: the int8 arithmetic, the block budget, and the engine with paging, preemption
and prefix caching on int8 blocks."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import assert_same_or_near_tie

from kvserve import LLM, SamplingParams
from kvserve.kv.quant import (
    QuantizedKVCache,
    dequantize,
    dequantize_values,
    hadamard,
    kv_bytes_per_block,
    quantize,
    quantize_key_blocks,
    quantize_values,
)
from kvserve.kv_plan import kv_bytes_per_token, preset_config
from kvserve.models.attention import AttentionMetadata, KeyWrites, OpenBlocks, gather_kv, paged_attention, write_kv

TEXT = os.path.join(os.path.dirname(__file__), "data", "english_text.txt")
CPU = torch.device("cpu")


def test_hadamard_is_orthogonal_for_any_head_dim():
    for dim in (64, 128, 80, 96):
        h = hadamard(dim)
        assert torch.allclose(h @ h.T, torch.eye(dim), atol=1e-6)
    assert hadamard(64)[0, 0].item() == pytest.approx(1 / 8)


def test_int8_round_trip_error_is_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    q, scale = quantize(x, torch.int8, 127.0)
    assert q.dtype == torch.int8 and scale.shape == (50, 3)
    err = (dequantize(q, scale, torch.float32) - x).abs()
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-6).all()
    zero = torch.zeros(1, 1, 8)
    qz, sz = quantize(zero, torch.int8, 127.0)
    assert torch.equal(dequantize(qz, sz, torch.float32), zero)  # all-zero heads stay finite and exact


def test_values_take_a_scale_per_32_channels():
    torch.manual_seed(0)
    x = torch.randn(10, 3, 64)
    x[..., :32] *= 50  # one loud half: the quiet half keeps its own, finer scale
    q, scale = quantize_values(x, torch.int8, 127.0)
    assert q.shape == x.shape and scale.shape == (10, 3, 2)
    assert torch.equal(scale, x.unflatten(-1, (2, 32)).abs().amax(-1) / 127)
    err = (dequantize_values(q, scale, torch.float32) - x).unflatten(-1, (2, 32)).abs()
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-5).all()
    assert quantize_values(torch.randn(4, 2, 80), torch.int8, 127.0)[1].shape == (4, 2, 1)  # 80: one group


def test_key_blocks_quantize_per_channel_within_half_a_step():
    torch.manual_seed(0)
    keys = torch.randn(5, 16, 3, 64)  # [blocks, block size, heads, channels]
    keys[:, :, :, :4] += 30  # a channel far from zero but narrow within a block: its center absorbs it
    keys[:, :, 1, 7] = 2.5  # a constant channel
    codes, scale, center = quantize_key_blocks(keys, torch.int8, 127.0)
    assert codes.dtype == torch.int8 and scale.shape == center.shape == (5, 3, 64)
    restored = codes.float() * scale.unsqueeze(1) + center.unsqueeze(1)
    assert ((restored - keys).abs() <= scale.unsqueeze(1) / 2 + 1e-5).all()
    assert torch.equal(restored[:, :, 1, 7], keys[:, :, 1, 7])  # constant channels are exact
    assert codes.abs().max() == 127  # each channel's range spans the codes
    assert (scale[:, :, :4] < 2 * 4 / 254).all()  # the offset costs nothing: range ~4 sigma, not 34


def test_bytes_per_block_include_scales():
    # SmolLM2: 30 layers, 3 KV heads, head dim 64, 16-token blocks
    assert kv_bytes_per_block(30, 3, 64, 16, torch.float32, "auto") == 16 * 30 * 2 * 3 * 64 * 4 == 16 * 46080
    # codes 16 x 2 x 64, K scale and center 2 x 64 x 4, V scales 16 x 2 x 4: 15,120 B/token, 3.0x fewer than fp32
    assert kv_bytes_per_block(30, 3, 64, 16, torch.float32, "int8") == 30 * 3 * (2048 + 512 + 128) == 16 * 15120
    # the planner's per-token figure is the same arithmetic (Llama-3-8B: 1.52x fewer than bf16)
    assert kv_bytes_per_block(32, 8, 128, 16, torch.bfloat16, "int8") == 16 * 86016
    assert kv_bytes_per_token(preset_config("llama-3-8b"), "int8").total == 86016


def write(cache, k, v, spans, block_size):
    """write_kv of a step: spans as KeyWrites.plan takes them, slots from each span's block table."""
    slots = [table[p // block_size] * block_size + p % block_size for _, s, e, table, _ in spans for p in range(s, e)]
    meta = AttentionMetadata(torch.tensor(slots), 0, key_writes=KeyWrites.plan(spans, block_size, CPU))
    write_kv(cache, k, v, meta)


def test_keys_of_open_blocks_stay_exact_until_their_block_is_full():
    # Two sequences written in chunks that start and end mid-block, cross blocks and refill a slot
    # in one step (seq A: 0-5, 5-6, 6-37, 37-38; seq B decodes alongside). Full blocks must hold
    # exactly what quantizing their whole keys at once gives; open blocks their keys, unrounded.
    torch.manual_seed(0)
    bs, heads, dim = 8, 2, 16
    cache = QuantizedKVCache.allocate("int8", 12, bs, heads, dim, 2, torch.float32, CPU)
    keys = {name: torch.randn(40, heads, dim) for name in "AB"}
    values = torch.randn(40, heads, dim)
    tables = {"A": [3, 7, 1, 9, 0], "B": [2, 5, 6, 4, 8]}
    slot = {"A": 1, "B": 0}
    steps = [[("A", 0, 5)], [("A", 5, 6), ("B", 0, 7)], [("B", 7, 8), ("A", 6, 37)], [("A", 37, 38), ("B", 8, 9)]]
    for step in steps:
        spans, flat, k, v = [], 0, [], []
        for name, start, end in step:
            spans.append((flat, start, end, tables[name], slot[name]))
            k.append(keys[name][start:end])
            v.append(values[start:end])
            flat += end - start
        write(cache, torch.cat(k), torch.cat(v), spans, bs)
    for name, written in (("A", 38), ("B", 9)):
        full = written // bs
        expect_codes, expect_scale, expect_center = quantize_key_blocks(
            keys[name][: full * bs].view(full, bs, heads, dim), torch.int8, 127.0
        )
        ids = torch.tensor(tables[name][:full])
        assert torch.equal(cache.data[0, ids], expect_codes)
        assert torch.equal(cache.key_params[0, ids], expect_scale)
        assert torch.equal(cache.key_params[1, ids], expect_center)
        open_rows = written - full * bs
        assert torch.equal(cache.open_keys[slot[name], :open_rows], keys[name][full * bs : written])
        # a gather reads full blocks dequantized and the open block from open_keys
        table = torch.tensor(tables[name][: full + 1])
        gathered, _ = gather_kv(
            cache, table, torch.float32, OpenBlocks.of_last_blocks([written], [slot[name]], bs, CPU)
        )
        assert torch.equal(gathered[full * bs : written], keys[name][full * bs : written])
        restored = torch.addcmul(expect_center.unsqueeze(1), expect_codes.float(), expect_scale.unsqueeze(1))
        assert torch.equal(gathered[: full * bs], restored.flatten(0, 1))


def test_attention_on_int8_cache_matches_full_precision():
    torch.manual_seed(1)
    heads, kv_heads, dim, bs, blocks = 4, 2, 64, 16, 6
    full = torch.zeros(2, blocks, bs, kv_heads, dim)
    quant = QuantizedKVCache.allocate("int8", blocks, bs, kv_heads, dim, 1, torch.float32, CPU)
    ctx = 40
    k, v = torch.randn(ctx, kv_heads, dim), torch.randn(ctx, kv_heads, dim)
    k[:, :, :4] *= 20  # outlier channels, as RoPE'd keys have
    write(full, k, v, [(0, 0, ctx, [0, 1, 2], 0)], bs)
    write(quant, k, v, [(0, 0, ctx, [0, 1, 2], 0)], bs)
    _, gv = gather_kv(quant, torch.tensor([0, 1, 2]), torch.float32)
    assert torch.allclose(gv[:ctx] @ quant.rotation.T, v, atol=0.05)  # values stored rotated
    q = torch.randn(1, heads, dim)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([ctx - 1]),
        num_decode_tokens=1,
        decode_block_tables=torch.tensor([[0, 1, 2]]),
        decode_mask=(torch.arange(48) < ctx)[None, None, None],
        decode_open=OpenBlocks.of_last_blocks([ctx], [0], bs, CPU),
    )
    ref = paged_attention(q, k[-1:], v[-1:], full, meta, dim**-0.5)
    got = paged_attention(q, k[-1:], v[-1:], quant, meta, dim**-0.5)
    assert (got - ref).abs().max().item() < 0.03


def test_fp8_is_refused_on_cpu():
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU"):
        LLM(kv_cache_dtype="fp8", device="cpu")


@pytest.fixture(scope="module")
def int8_llm():
    return LLM(kv_cache_memory="64MiB", kv_cache_dtype="int8", max_num_batched_tokens=64)


BLOCK_BYTES = 16 * 15120  # an int8 block of SmolLM2 (see test_bytes_per_block_include_scales)
OPEN_SLOT_BYTES = 30 * 16 * 3 * 64 * 4  # one sequence's open block of fp32 keys
# Two int8 runs that compute a token along different paths (a prefix-cache hit or not, other chunk
# boundaries, a recompute after preemption) quantize keys from float-rounding-different inputs, and a
# code may land one step apart: their logprobs differ by up to ~0.014 on the prompts below, so a
# near-tie here is anything under 0.05 (a wrong block or slot moves logprobs by far more).
INT8_TIE = 0.05


def test_int8_holds_more_blocks_and_keeps_perplexity(int8_llm):
    full = LLM(kv_cache_memory="64MiB", max_num_batched_tokens=64)
    # open blocks for 128 sequences would take over half of 64 MiB: the engine runs fewer at once
    open_slots = 32 * 2**20 // OPEN_SLOT_BYTES
    assert int8_llm.engine.config.max_num_seqs == int8_llm.engine.kv.num_open_slots == open_slots == 91
    assert int8_llm.engine.kv.pool.num_blocks == (64 * 2**20 - open_slots * OPEN_SLOT_BYTES) // BLOCK_BYTES
    assert full.engine.kv.pool.num_blocks == (64 * 2**20) // (16 * 46080)
    with open(TEXT) as f:
        ids = full.tokenizer.encode(f.read(), add_special_tokens=False)[:1024]

    def ppl(llm):
        out = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
        lps = [entry[t] for entry, t in zip(out.prompt_logprobs[1:], ids[1:])]
        return math.exp(-sum(lps) / len(lps))

    ref, got = ppl(full), ppl(int8_llm)
    assert abs(got / ref - 1) < 0.01, (ref, got)
    full.engine.check_idle()


def test_int8_with_preemption_prefix_cache_and_forks(int8_llm):
    tok = int8_llm.tokenizer
    shared = tok.encode("A long shared instruction about writing clear, short answers for every question. " * 4)
    prompts = [shared + tok.encode(f" Question {i}: what is {i} plus {i}?") for i in range(10)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    reference = int8_llm.generate(prompts, params)
    assert int8_llm.get_stats()["prefix_cache_hits"] > 0
    # 12 blocks, 4 sequences at most (so 4 open slots): requests are preempted for blocks
    small = LLM(
        kv_cache_memory=12 * BLOCK_BYTES + 4 * OPEN_SLOT_BYTES,
        kv_cache_dtype="int8",
        max_num_batched_tokens=64,
        max_num_seqs=4,
    )
    assert small.engine.kv.pool.num_blocks == 12 and small.engine.kv.num_open_slots == 4
    outs = small.generate(prompts, params)
    assert small.get_stats()["num_preemptions"] > 0
    for out, ref in zip(outs, reference):
        assert_same_or_near_tie(out.outputs[0].token_ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs, INT8_TIE)
    small.engine.check_idle()
    # 13-token steps: prefill chunks start and end mid-block, so chunks attend open blocks' exact keys
    chunked = LLM(kv_cache_memory="16MiB", kv_cache_dtype="int8", max_num_batched_tokens=13)
    for out, ref in zip(chunked.generate(prompts[:4], params), reference):
        assert_same_or_near_tie(out.outputs[0].token_ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs, INT8_TIE)
    chunked.engine.check_idle()
    # n=3 forks copy the prompt's open block, keys included: every sample equals the single greedy run
    prompt = prompts[3]
    assert len(prompt) % 16 != 0
    (three,) = int8_llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=16, ignore_eos=True))
    (one,) = int8_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in three.outputs] == [one.outputs[0].token_ids] * 3
    int8_llm.engine.check_idle()
