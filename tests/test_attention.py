"""Paged decode attention: the cascade (shared-prefix) path equals the plain path, on plain and int8
caches, and the engine's greedy output is unchanged when decodes share prefix blocks."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_or_near_tie, save_tiny_model

import kvserve.models.attention as attention
from kvserve import LLM, SamplingParams, kernels
from kvserve.kv.quant import QuantizedKVCache, dequantize_values
from kvserve.models.attention import (
    AttentionMetadata,
    DecodeCascade,
    KeyWrites,
    WindowBlocks,
    block_tables_and_mask,
    paged_attention,
    write_kv,
)

BS, HKV, G, D = 4, 2, 3, 16  # block size, KV heads, query heads per KV head, head dim
NUM_BLOCKS = 48


def random_cache(kind: str, num_windows: int = 1) -> attention.KVCache:
    torch.manual_seed(0)
    k = torch.randn(NUM_BLOCKS * BS, HKV, D)
    v = torch.randn(NUM_BLOCKS * BS, HKV, D)
    k[:, :, :2] *= 10  # outlier channels, as RoPE'd keys have
    if kind == "plain":
        cache = torch.zeros(2, NUM_BLOCKS, BS, HKV, D)
    else:
        cache = QuantizedKVCache.allocate(kind, NUM_BLOCKS, BS, HKV, D, num_windows, torch.float32, torch.device("cpu"))
    tokens = NUM_BLOCKS * BS
    meta = AttentionMetadata(torch.arange(tokens), 0)
    meta.key_writes = KeyWrites.plan([(0, 0, tokens, list(range(NUM_BLOCKS)), 0, 0)], BS, torch.device("cpu"))
    write_kv(cache, k, v, meta)  # every block full: all of K quantized per channel
    return cache


def decode(
    cache: attention.KVCache,
    tables: list[list[int]],
    lens: list[int],
    cascade: bool,
    windows: tuple[list[int], list[int]] | None = None,  # per decode: window slot, first position written
) -> torch.Tensor:
    nd = len(tables)
    torch.manual_seed(1)
    q = torch.randn(nd, HKV * G, D)
    kv = torch.zeros(nd, HKV, D)  # this step's K/V: only prefill spans read them
    block_tables, mask = block_tables_and_mask(tables, lens, BS, torch.device("cpu"))
    meta = AttentionMetadata(torch.zeros(nd, dtype=torch.long), nd, block_tables, mask)
    if windows is not None:
        meta.decode_window = WindowBlocks.of_rows(lens, *windows, BS, torch.device("cpu"))
    if cascade:
        meta.decode_cascade = DecodeCascade.build(tables, lens, BS, torch.device("cpu"), windows)
        assert meta.decode_cascade is not None
    return paged_attention(q, kv, kv, cache, meta, D**-0.5)


def dequantized_copy(cache: QuantizedKVCache) -> torch.Tensor:
    """The plain cache holding what `cache` represents: K dequantized per channel, V per token and rotated back."""
    keys = cache.data[0].float() * cache.key_params[0].unsqueeze(1) + cache.key_params[1].unsqueeze(1)
    values = dequantize_values(cache.data[1], cache.value_scales[0], torch.float32) @ cache.rotation.T
    return torch.stack([keys, values])


@pytest.mark.parametrize("kind", ["int8", "fp8"])  # fp8 is served on CUDA only, but its arithmetic runs here
@pytest.mark.parametrize("cascade", [False, True])
def test_quantized_decode_equals_attention_over_dequantized_kv(kind, cascade):
    # Decode attention dequantizes what it gathers and un-rotates its outputs; it must equal plain
    # attention over the dequantized K/V up to fp32 round-off.
    cache = random_cache(kind)
    tables = [[0, 1, 2, 10], [0, 1, 2, 11, 12], [0, 1, 2, 13], [14, 15]]
    lens = [3 * BS + 1, 4 * BS + 3, 4 * BS, 2 * BS - 1]
    ref = decode(dequantized_copy(cache), tables, lens, cascade=False)
    got = decode(cache, tables, lens, cascade=cascade)
    assert (got - ref).abs().max().item() < 1e-5


def own_blocks(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


@pytest.mark.parametrize("kind", ["plain", "int8", "fp8"])
@pytest.mark.parametrize("prefix_blocks", [1, 2, 5])
def test_cascade_equals_plain_decode(kind, prefix_blocks):
    cache = random_cache(kind)
    prefix = own_blocks(0, prefix_blocks)
    # context length past the prefix (new token included): the new token alone, opening a block;
    # ending a block; one past a block; several blocks
    suffix_lens = [1, BS, BS + 1, 3 * BS - 1, 2]
    tables, lens, next_block = [], [], 20
    for n in suffix_lens:
        count = -(-n // BS)
        tables.append(prefix + own_blocks(next_block, count))
        lens.append(prefix_blocks * BS + n)
        next_block += count
    cascade = DecodeCascade.build(tables, lens, BS, torch.device("cpu"))
    assert len(cascade.groups) == 1 and cascade.groups[0].block_ids.tolist() == prefix
    assert cascade.suffix_mask.sum(-1).flatten().tolist() == suffix_lens
    ref = decode(cache, tables, lens, cascade=False)
    got = decode(cache, tables, lens, cascade=True)
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["plain", "int8", "fp8"])
def test_cascade_groups_and_loners(kind):
    cache = random_cache(kind)
    a, b = own_blocks(0, 3), own_blocks(3, 2)
    tables = [
        a + [10],  # group a (prefix 3 blocks: [0, 1, 2])
        b + [11, 12],  # group b (prefix 2 blocks)
        [13, 14],  # alone
        a + [15, 16],  # group a
        b[:1] + [17],  # group b, which it cuts to 1 block: [3]
        a[:2] + [18],  # group a, which it cuts to 2 blocks: [0, 1]
        b + [19],  # group b
        [20],  # alone, one block
    ]
    lens = [4 * BS, 3 * BS + 2, BS + 3, 5 * BS, 2 * BS, 2 * BS + 1, 3 * BS, 3]
    cascade = DecodeCascade.build(tables, lens, BS, torch.device("cpu"))
    groups = {tuple(g.rows.tolist()): g.block_ids.tolist() for g in cascade.groups}
    assert groups == {(0, 3, 5): [0, 1], (1, 4, 6): [3]}
    ref = decode(cache, tables, lens, cascade=False)
    got = decode(cache, tables, lens, cascade=True)
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("first_written, shared", [(0, [0, 1]), (3 * BS, [0, 1, 2])])
def test_cascade_with_windows_equals_plain_decode(first_written, shared):
    # int8 decodes read their last two blocks from their windows, not their codes. Row 0's window
    # reaches into the shared blocks (it wrote them itself, before the others hit them in the prefix
    # cache), so the cascade's prefix stops before its window; unless row 0 hit them too
    # (first_written past them), when they are codes for every row. Either way, as without cascade.
    cache = random_cache("int8", num_windows=4)
    torch.manual_seed(2)
    cache.window.normal_()  # what four sequences wrote, unlike their blocks' codes
    prefix = own_blocks(0, 3)
    tables = [prefix + [20], prefix + [21, 22], prefix + [23], prefix + [24, 25, 26]]
    lens = [3 * BS + 1, 4 * BS + 2, 4 * BS, 5 * BS + 3]
    windows = ([0, 1, 2, 3], [first_written, 0, 0, 3 * BS])
    cascade = DecodeCascade.build(tables, lens, BS, torch.device("cpu"), windows)
    assert [g.block_ids.tolist() for g in cascade.groups] == [shared]
    ref = decode(cache, tables, lens, cascade=False, windows=windows)
    got = decode(cache, tables, lens, cascade=True, windows=windows)
    assert (got - ref).abs().max().item() < 1e-5
    # the windows are read: without them, the output differs
    assert (decode(cache, tables, lens, cascade=False) - ref).abs().max().item() > 1e-2


def test_cascade_stops_before_the_new_tokens_block():
    # Identical tables (malformed for a real batch, where the block being written is never shared):
    # the shared run still ends before the block holding the earliest new token.
    tables = [[0, 1, 2], [0, 1, 2]]
    cascade = DecodeCascade.build(tables, [2 * BS + 1, 3 * BS], BS, torch.device("cpu"))
    assert cascade.groups[0].block_ids.tolist() == [0, 1]
    assert DecodeCascade.build(tables, [BS, 3 * BS], BS, torch.device("cpu")) is None  # new token in block 0
    assert DecodeCascade.build([[0, 1], [2, 3]], [2 * BS, 2 * BS], BS, torch.device("cpu")) is None
    assert DecodeCascade.build([[0, 1]], [2 * BS], BS, torch.device("cpu")) is None  # one decode alone
    # 1 block of 4 shared by 2 decodes saves 1 of 8 gathered blocks: not worth the cascade
    assert DecodeCascade.build([[0, 1, 2, 3], [0, 4, 5, 6]], [4 * BS, 4 * BS], BS, torch.device("cpu")) is None


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "float16", "float16 plain PyTorch"])
def test_engine_shared_prefix_decodes_equal_each_alone(tmp_path, monkeypatch, kv_cache_dtype):
    """Cascade decodes over a shared cached prefix, plain, int8 and float16 caches (the float16 one read
    by the compiled kernels, and by the plain PyTorch path, which converts what it gathers). The engine
    runs the cascade on its own only where decodes gather (the plain path); it is forced on here where
    the kernels read blocks in place, so that its result is checked on every cache."""
    plain_path = kv_cache_dtype.endswith("plain PyTorch")
    if plain_path:
        monkeypatch.setenv("KVSERVE_CPU_KERNELS", "0")
        kv_cache_dtype = kv_cache_dtype.split()[0]
    save_tiny_model(str(tmp_path), "llama")
    calls = []
    cascade_attention = attention.cascade_decode_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return cascade_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "cascade_decode_attention", counting)
    system = [(7 * i) % 300 + 3 for i in range(64)]  # 4 blocks of 16 shared
    prompts = [system + [(11 * i + j) % 300 + 3 for j in range(2 + 5 * i)] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    options = dict(model=str(tmp_path), kv_cache_memory="16MiB", kv_cache_dtype=kv_cache_dtype)

    # Both engines cache the system prompt first, so every prompt reads the same (for int8: the
    # same quantized) prefix K/V in both, and only the batching differs.
    alone = LLM(**options, max_num_seqs=1)
    alone.generate([system], SamplingParams(max_tokens=1), use_tqdm=False)
    reference = alone.generate(prompts, params, use_tqdm=False)
    alone.engine.check_idle()
    assert not calls  # one decode at a time: nothing to share

    llm = LLM(**options)
    assert llm.engine.runner.decodes_read_in_place is not plain_path
    llm.engine.runner.cascade_attention = True
    llm.generate([system], SamplingParams(max_tokens=1), use_tqdm=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(calls) == 19 * 3  # every decode step after the first token (from prefill), in each of 3 layers
    for out, ref in zip(outs, reference):
        assert out.num_cached_tokens == 64
        assert_same_or_near_tie(out.outputs[0].token_ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs)
    llm.engine.check_idle()


@pytest.mark.parametrize("kernels_on", [True, False])
def test_engine_runs_the_cascade_only_where_decodes_gather(tmp_path, monkeypatch, kernels_on):
    """By default the cascade runs where decode attention gathers blocks (the plain PyTorch path) and not
    where the compiled kernels read them in place; the outputs are the same either way."""
    if not kernels_on:
        monkeypatch.setenv("KVSERVE_CPU_KERNELS", "0")
    elif kernels.compute_ops() is None:
        pytest.skip("the compiled CPU kernels are not built on this machine")
    save_tiny_model(str(tmp_path), "llama")
    calls = []
    cascade_attention = attention.cascade_decode_attention
    monkeypatch.setattr(
        attention, "cascade_decode_attention", lambda *a, **k: calls.append(1) or cascade_attention(*a, **k)
    )
    system = [(7 * i) % 300 + 3 for i in range(64)]
    prompts = [system + [(11 * i + j) % 300 + 3 for j in range(3 + i)] for i in range(4)]
    llm = LLM(model=str(tmp_path), kv_cache_memory="16MiB", kv_cache_dtype="float16")
    llm.generate([system], SamplingParams(max_tokens=1), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(calls) == (0 if kernels_on else 5 * 3)  # 5 decode steps after the prefill's token, 3 layers
    llm.engine.runner.cascade_attention = not kernels_on  # the other way round: the same tokens
    for out, ref in zip(llm.generate(prompts, params, use_tqdm=False), outs):
        assert_same_or_near_tie(out.outputs[0].token_ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs)
