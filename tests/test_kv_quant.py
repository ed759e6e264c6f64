"""Quantized KV cache: the int8 arithmetic, the block budget, and the engine with paging, preemption
and prefix caching on int8 blocks."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import assert_same_or_near_tie

from kvserve import LLM, SamplingParams
from kvserve.kv.quant import QuantizedKVCache, dequantize, hadamard, kv_bytes_per_token, quantize
from kvserve.models.attention import AttentionMetadata, gather_kv, paged_attention, write_kv

TEXT = os.path.join(os.path.dirname(__file__), "data", "english_text.txt")


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


def test_bytes_per_token_include_scales():
    # SmolLM2: 30 layers, 3 KV heads, head dim 64
    assert kv_bytes_per_token(30, 3, 64, torch.float32, "auto") == 30 * 2 * 3 * 64 * 4 == 46080
    assert kv_bytes_per_token(30, 3, 64, torch.float32, "int8") == 30 * 2 * 3 * (64 + 4) == 12240
    assert kv_bytes_per_token(32, 8, 128, torch.bfloat16, "int8") == 32 * 2 * 8 * 132  # 1.94x fewer than bf16


def test_attention_on_int8_cache_matches_full_precision():
    torch.manual_seed(1)
    heads, kv_heads, dim, bs, blocks = 4, 2, 64, 16, 6
    full = torch.zeros(2, blocks, bs, kv_heads, dim)
    quant = QuantizedKVCache.allocate("int8", blocks, bs, kv_heads, dim, torch.device("cpu"))
    ctx = 40
    k, v = torch.randn(ctx, kv_heads, dim), torch.randn(ctx, kv_heads, dim)
    k[:, :, :4] *= 20  # outlier channels, as RoPE'd keys have
    slots = torch.arange(ctx)
    write_kv(full, k, v, slots)
    write_kv(quant, k, v, slots)
    gk, _ = gather_kv(quant, torch.tensor([0, 1, 2]), torch.float32)
    assert torch.allclose(gk[:ctx] @ quant.rotation.T, k, atol=0.2)  # stored rotated
    q = torch.randn(1, heads, dim)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([ctx - 1]),
        num_decode_tokens=1,
        decode_block_tables=torch.tensor([[0, 1, 2]]),
        decode_mask=(torch.arange(48) < ctx)[None, None, None],
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


def test_int8_holds_more_blocks_and_keeps_perplexity(int8_llm):
    full = LLM(kv_cache_memory="64MiB", max_num_batched_tokens=64)
    assert int8_llm.engine.kv.pool.num_blocks == (64 * 2**20) // (16 * 12240)
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


def test_int8_with_preemption_and_prefix_cache(int8_llm):
    tok = int8_llm.tokenizer
    shared = tok.encode("A long shared instruction about writing clear, short answers for every question. " * 4)
    prompts = [shared + tok.encode(f" Question {i}: what is {i} plus {i}?") for i in range(10)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    reference = int8_llm.generate(prompts, params)
    assert int8_llm.get_stats()["prefix_cache_hits"] > 0
    small = LLM(kv_cache_memory=20 * 16 * 12240, kv_cache_dtype="int8", max_num_batched_tokens=64)
    outs = small.generate(prompts, params)
    assert small.get_stats()["num_preemptions"] > 0
    for out, ref in zip(outs, reference):
        assert_same_or_near_tie(out.outputs[0].token_ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs)
    small.engine.check_idle()
    int8_llm.engine.check_idle()
