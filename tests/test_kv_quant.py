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
from kvserve.models.attention import (
    AttentionMetadata,
    KeyWrites,
    WindowBlocks,
    gather_kv,
    paged_attention,
    write_kv,
)

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
    slots = [table[p // block_size] * block_size + p % block_size for _, s, e, table, *_ in spans for p in range(s, e)]
    meta = AttentionMetadata(torch.tensor(slots), 0, key_writes=KeyWrites.plan(spans, block_size, CPU))
    write_kv(cache, k, v, meta)


def test_windows_hold_the_last_two_blocks_and_full_blocks_are_quantized_once():
    # Two sequences written in chunks that start and end mid-block, cross blocks and reuse a window
    # entry in one step (seq A: 0-5, 5-6, 6-37, 37-38; seq B decodes alongside, and its window starts
    # at 8, as after an 8-token prefix-cache hit). Full blocks must hold exactly what quantizing their
    # whole keys at once gives (in the window's fp16, whichever step wrote them); each window the K
    # and V (rotated) of its sequence's last two blocks, and a gather must read those from there.
    torch.manual_seed(0)
    bs, heads, dim = 8, 2, 16
    cache = QuantizedKVCache.allocate("int8", 12, bs, heads, dim, 2, torch.float32, CPU)
    assert cache.window.dtype == torch.float16  # an fp32 model's window
    keys = {name: torch.randn(40, heads, dim) for name in "AB"}
    values = {name: torch.randn(40, heads, dim) for name in "AB"}
    tables = {"A": [3, 7, 1, 9, 0], "B": [2, 5, 6, 4, 8]}
    slot, first_written = {"A": 1, "B": 0}, {"A": 0, "B": 8}
    steps = [[("A", 0, 5)], [("A", 5, 6), ("B", 8, 15)], [("B", 15, 16), ("A", 6, 37)], [("A", 37, 38), ("B", 16, 17)]]
    for step in steps:
        spans, flat, k, v = [], 0, [], []
        for name, start, end in step:
            spans.append((flat, start, end, tables[name], slot[name], first_written[name]))
            k.append(keys[name][start:end])
            v.append(values[name][start:end])
            flat += end - start
        write(cache, torch.cat(k), torch.cat(v), spans, bs)
    for name, written, window_blocks in (("A", 38, [3, 4]), ("B", 17, [1, 2])):
        full = written // bs
        first = first_written[name] // bs  # B's block 0 came from the prefix cache: never written here
        expect_codes, expect_scale, expect_center = quantize_key_blocks(
            keys[name][first * bs : full * bs].half().view(full - first, bs, heads, dim), torch.int8, 127.0
        )
        ids = torch.tensor(tables[name][first:full])
        assert torch.equal(cache.data[0, ids], expect_codes)
        assert torch.equal(cache.key_params[0, ids], expect_scale)
        assert torch.equal(cache.key_params[1, ids], expect_center)
        rotated = values[name] @ cache.rotation
        for b in window_blocks:
            rows = slice(b * bs, min(written, (b + 1) * bs))
            entry = cache.window[:, slot[name], b % 2, : rows.stop - rows.start]
            assert torch.equal(entry[0], keys[name][rows].half())
            assert torch.equal(entry[1], rotated[rows].half())
        # a gather reads the blocks before the window dequantized, and the window's from the window
        table = torch.tensor(tables[name][: full + 1])
        window = WindowBlocks.of_rows([written], [slot[name]], [first_written[name]], bs, CPU)
        assert window.cols.tolist() == window_blocks
        gathered_k, gathered_v = gather_kv(cache, table, torch.float32, window)
        start = window_blocks[0] * bs
        assert torch.equal(gathered_k[start:written], keys[name][start:written].half().float())
        assert torch.equal(gathered_v[start:written], rotated[start:written].half().float())
        restored = torch.addcmul(expect_center.unsqueeze(1), expect_codes.float(), expect_scale.unsqueeze(1))
        assert torch.equal(gathered_k[first * bs : start], restored.flatten(0, 1)[: start - first * bs])


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.03), ("fp8", 0.1)])  # fp8: CUDA-only in the engine
def test_attention_on_quantized_cache_matches_full_precision(kind, tolerance):
    torch.manual_seed(1)
    heads, kv_heads, dim, bs, blocks = 4, 2, 64, 16, 6
    full = torch.zeros(2, blocks, bs, kv_heads, dim)
    quant = QuantizedKVCache.allocate(kind, blocks, bs, kv_heads, dim, 1, torch.float32, CPU)
    ctx = 40
    k, v = torch.randn(ctx, kv_heads, dim), torch.randn(ctx, kv_heads, dim)
    k[:, :, :4] *= 20  # outlier channels, as RoPE'd keys have
    write(full, k, v, [(0, 0, ctx, [0, 1, 2], 0, 0)], bs)
    write(quant, k, v, [(0, 0, ctx, [0, 1, 2], 0, 0)], bs)
    _, gv = gather_kv(quant, torch.tensor([0, 1, 2]), torch.float32)  # codes only, no window
    assert torch.allclose(gv[:ctx] @ quant.rotation.T, v, atol=2 * tolerance)  # values stored rotated
    q = torch.randn(1, heads, dim)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([ctx - 1]),
        num_decode_tokens=1,
        decode_block_tables=torch.tensor([[0, 1, 2]]),
        decode_mask=(torch.arange(48) < ctx)[None, None, None],
        decode_window=WindowBlocks.of_rows([ctx], [0], [0], bs, CPU),
    )
    ref = paged_attention(q, k[-1:], v[-1:], full, meta, dim**-0.5)
    got = paged_attention(q, k[-1:], v[-1:], quant, meta, dim**-0.5)
    assert (got - ref).abs().max().item() < tolerance


def test_fp8_is_refused_on_cpu():
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU"):
        LLM(kv_cache_dtype="fp8", device="cpu")
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto, float16, int8 or fp8, got 'fp16'"):
        LLM(kv_cache_dtype="fp16")
    with pytest.raises(ValueError, match="kv_cache_dtype float16 is for float32 models; a bfloat16 model's"):
        LLM(kv_cache_dtype="float16", dtype="bfloat16")


@pytest.fixture(scope="module")
def int8_llm():
    return LLM(kv_cache_memory="64MiB", kv_cache_dtype="int8", max_num_batched_tokens=64)


BLOCK_BYTES = 16 * 15120  # an int8 block of SmolLM2 (see test_bytes_per_block_include_scales)
WINDOW_BYTES = 30 * 2 * 2 * 16 * 3 * 64 * 2  # one sequence's window: K and V of two blocks in fp16
# Two int8 runs that compute a token along different paths (a prefix-cache hit or not, other chunk
# boundaries, a recompute after preemption) quantize keys from float-rounding-different inputs, and a
# code may land one step apart: their logprobs differ by up to ~0.014 on the prompts below, so a
# near-tie here is anything under 0.05 (a wrong block or slot moves logprobs by far more).
INT8_TIE = 0.05


def test_int8_holds_more_blocks_and_keeps_perplexity(int8_llm):
    full = LLM(kv_cache_memory="64MiB", max_num_batched_tokens=64)
    # windows for 128 sequences would take over half of 64 MiB: the engine runs fewer at once
    open_slots = 32 * 2**20 // WINDOW_BYTES
    assert int8_llm.engine.config.max_num_seqs == int8_llm.engine.kv.num_open_slots == open_slots == 45
    assert int8_llm.engine.kv.pool.num_blocks == (64 * 2**20 - open_slots * WINDOW_BYTES) // BLOCK_BYTES
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
    # 8 blocks, 2 sequences at most (so 2 windows): requests are preempted for blocks
    small = LLM(
        kv_cache_memory=8 * BLOCK_BYTES + 2 * WINDOW_BYTES,
        kv_cache_dtype="int8",
        max_num_batched_tokens=64,
        max_num_seqs=2,
    )
    assert small.engine.kv.pool.num_blocks == 8 and small.engine.kv.num_open_slots == 2
    outs = small.generate(prompts, params)
    assert small.get_stats()["num_preemptions"] > 0
    for out, ref in zip(outs, reference):
        assert_same_or_near_tie(out.outputs[0].token_ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs, INT8_TIE)
    small.engine.check_idle()
    # 13-token steps: prefill chunks start and end mid-block, and attend their windows
    chunked = LLM(kv_cache_memory="16MiB", kv_cache_dtype="int8", max_num_batched_tokens=13)
    for out, ref in zip(chunked.generate(prompts[:4], params), reference):
        assert_same_or_near_tie(out.outputs[0].token_ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs, INT8_TIE)
    chunked.engine.check_idle()
    # n=3 forks copy the prompt's open block and its window (also when the prompt fills its last
    # block, which the window still holds): every sample equals the single greedy run
    for prompt in (prompts[3], prompts[3][:48]):
        (three,) = int8_llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=16, ignore_eos=True))
        (one,) = int8_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        assert [o.token_ids for o in three.outputs] == [one.outputs[0].token_ids] * 3
    assert len(prompts[3]) % 16 != 0
    int8_llm.engine.check_idle()


def test_window_of_an_fp32_model_clamps_to_fp16_range():
    # A key past fp16's range would be infinite in the window and poison its head's scores; it is
    # clamped instead (the codes of its block, quantized from the window's values, stay finite too).
    bs, heads, dim = 4, 1, 32
    cache = QuantizedKVCache.allocate("int8", 2, bs, heads, dim, 1, torch.float32, CPU)
    k = torch.ones(bs, heads, dim)
    k[1, 0, 3] = 1e6
    write(cache, k, torch.ones(bs, heads, dim), [(0, 0, bs, [1], 0, 0)], bs)
    assert cache.window[0, 0, 0, 1, 0, 3].item() == 65504.0
    assert torch.isfinite(cache.window).all() and torch.isfinite(cache.key_params).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_cache_dtype, max_ppl_change", [("int8", 0.01), ("fp8", 0.03)])
def test_quantized_kv_on_cuda_keeps_perplexity(kv_cache_dtype, max_ppl_change):
    # The CUDA path is attention.py's PyTorch one (the compiled kernels are CPU-only); fp8 is CUDA-only.
    with open(TEXT) as f:
        text = f.read()
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)

    def ppl(**kwargs) -> float:
        llm = LLM(device="cuda", kv_cache_memory="256MiB", max_num_batched_tokens=64, **kwargs)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)[:1024]
        out = llm.generate([ids], params)[0]
        llm.engine.check_idle()
        lps = [entry[t] for entry, t in zip(out.prompt_logprobs[1:], ids[1:])]
        return math.exp(-sum(lps) / len(lps))

    ref, got = ppl(), ppl(kv_cache_dtype=kv_cache_dtype)
    assert abs(got / ref - 1) < max_ppl_change, (ref, got)
