"""The compiled int8 KV kernels (kvserve/kernels/kv_dequant.cpp) against attention.py's plain PyTorch
path on the same cache: the fused gather and the fused decode attention, for fp32/bf16 models, head
dims with and without a compiled specialization, grouped queries, and the recent windows."""

from __future__ import annotations

import shutil

import pytest
import torch

import kvserve.kernels as kernels
from kvserve.kv.quant import QuantizedKVCache
from kvserve.models.attention import (
    AttentionMetadata,
    KeyWrites,
    WindowBlocks,
    block_tables_and_mask,
    gather_blocks,
    paged_attention,
    write_kv,
)

CPU = torch.device("cpu")
BS = 16


@pytest.fixture(scope="module")
def ops():
    built = kernels.cpu_ops()
    if built is None:
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler: the kernels cannot be built here")
        pytest.fail("a C++ compiler is present but kvserve's CPU kernels did not build (see the log)")
    return built


def filled_cache(
    num_blocks: int, heads: int, dim: int, dtype: torch.dtype, lens: list[int], seed: int = 0
) -> tuple[QuantizedKVCache, list[list[int]]]:
    """A cache holding one sequence per entry of lens, written in one step like a prefill (so full
    blocks are quantized and each sequence's last two blocks also sit in its window, slot i);
    block tables are scattered over the cache."""
    torch.manual_seed(seed)
    cache = QuantizedKVCache.allocate("int8", num_blocks, BS, heads, dim, len(lens), dtype, CPU)
    order = torch.randperm(num_blocks).tolist()
    tables, spans, slots, flat = [], [], [], 0
    for i, n in enumerate(lens):
        table = [order.pop() for _ in range(-(-n // BS))]
        tables.append(table)
        spans.append((flat, 0, n, table, i, 0))
        slots.extend(table[p // BS] * BS + p % BS for p in range(n))
        flat += n
    k, v = torch.randn(flat, heads, dim), torch.randn(flat, heads, dim)
    k[:, :, :4] *= 10  # outlier channels, as RoPE'd keys have
    meta = AttentionMetadata(torch.tensor(slots), 0, key_writes=KeyWrites.plan(spans, BS, CPU))
    write_kv(cache, k.to(dtype), v.to(dtype), meta)
    return cache, tables


def decode_meta(tables: list[list[int]], lens: list[int], first_written: list[int] | None = None) -> AttentionMetadata:
    """first_written: per sequence, the first position its window holds (0: all it wrote); a later one
    stands for a prefix-cache hit, whose blocks are read as codes only."""
    block_tables, mask = block_tables_and_mask(tables, lens, BS, CPU)
    meta = AttentionMetadata(torch.zeros(len(lens), dtype=torch.long), len(lens), block_tables, mask)
    starts = first_written or [0] * len(lens)
    meta.decode_window = WindowBlocks.of_rows(lens, list(range(len(lens))), starts, BS, CPU)
    return meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gather_equals_the_pytorch_dequantization(ops, monkeypatch, dtype):
    lens = [40, 16, 1, 33]
    cache, tables = filled_cache(24, 3, 64, dtype, lens)
    meta = decode_meta(tables, lens)
    got_k, got_v = (x.clone() for x in gather_blocks(cache, meta.decode_block_tables, dtype, meta.decode_window))
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    ref_k, ref_v = gather_blocks(cache, meta.decode_block_tables, dtype, meta.decode_window)
    assert torch.equal(got_v, ref_v)  # one product, rounded once, either way
    # keys: one fused multiply-add against PyTorch's addcmul, at most one rounding apart
    torch.testing.assert_close(got_k, ref_k, rtol=2**-22 if dtype == torch.float32 else 2**-7, atol=0)


@pytest.mark.parametrize(
    "dtype, heads, group, dim",
    [
        (torch.float32, 3, 3, 64),  # SmolLM2's shape, compiled specialization
        (torch.float32, 2, 4, 128),  # Llama-3's head dim, compiled specialization
        (torch.float32, 2, 1, 96),  # any other head dim, the generic loop: three value groups
        (torch.float32, 1, 2, 48),  # ... one value group (48 is no multiple of 32)
        (torch.bfloat16, 3, 3, 64),
    ],
)
def test_fused_decode_attention_equals_gather_and_sdpa(ops, monkeypatch, dtype, heads, group, dim):
    lens = [1, 15, 16, 17, 40, 64, 200, 40, 200]  # open last blocks and full ones, one and many blocks
    # the last two as if from the prefix cache up to their open block (40) or last full one (200)
    first_written = [0] * 7 + [32, 192]
    cache, tables = filled_cache(60, heads, dim, dtype, lens, seed=dim)
    torch.manual_seed(1)
    q = torch.randn(len(lens), heads * group, dim).to(dtype)
    new = torch.zeros(len(lens), heads, dim, dtype=dtype)  # this step's K/V: only prefill spans read them
    meta = decode_meta(tables, lens, first_written)
    _, _, window_from = meta.decode_rows()
    assert window_from.tolist() == [0, 0, 0, 0, 1, 3, 11, 2, 12]  # the last two blocks, less cache hits
    got = paged_attention(q, new, new, cache, meta, dim**-0.5)
    monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    ref = paged_attention(q, new, new, cache, decode_meta(tables, lens, first_written), dim**-0.5)
    # fp32 sums in another order (and, for bf16, one rounding of the output)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tolerance, atol=tolerance)
    assert not torch.equal(got, torch.zeros_like(got))


def test_fused_decode_attention_refuses_bad_tables_lengths_and_slots(ops):
    cache, tables = filled_cache(8, 1, 64, torch.float32, [20])
    q = torch.randn(1, 1, 1, 64)

    def decode(block_tables: list[list[int]], context_len: int = 20, slot: int = 0) -> None:
        ops.decode_attention(
            q,
            cache.data,
            cache.key_params,
            cache.value_scales,
            cache.window,
            torch.tensor(block_tables),
            torch.tensor([context_len]),
            torch.tensor([slot]),
            torch.tensor([0]),  # window_from
            0.125,
            torch.empty_like(q),
        )

    decode([tables[0]])  # well-formed: accepted
    with pytest.raises(ValueError, match="out of range"):
        decode([[99, 0]])
    with pytest.raises(ValueError, match="context length"):
        decode([tables[0]], context_len=33)
    with pytest.raises(ValueError, match="one row per query"):
        decode([tables[0], tables[0]])
    with pytest.raises(ValueError, match="window slot out of range"):
        decode([tables[0]], slot=1)  # the cache has one window slot


def test_without_the_kernels_attention_falls_back_to_pytorch(ops, monkeypatch, caplog):
    monkeypatch.setenv("KVSERVE_CPU_KERNELS", "0")
    assert kernels.cpu_ops() is None  # switched off, though built
    monkeypatch.delenv("KVSERVE_CPU_KERNELS")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_ops", None)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(kernels, "_build", no_compiler)
    with caplog.at_level("WARNING", logger="kvserve"):
        assert kernels.cpu_ops() is None and kernels.cpu_ops() is None  # tried once, logged once
    assert caplog.text.count("could not be built (no C++ compiler found)") == 1
