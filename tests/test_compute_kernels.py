"""Quantized weights (models/quantized.py) and the compute kernels (kernels/linear.cpp, fused.cpp,
paged_attention.cpp): GGUF blocks against gguf's own dequantization, every kernel against a float64
reference on random shapes (odd K, M from 1 to 67) and on every ISA path the machine has, the fused
operations against their PyTorch definitions, and decode attention against the gather + SDPA path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import kvserve.kernels as kernels
from kvserve.models import layers
from kvserve.models.quantized import GGUF_QUANTIZED, QuantizedWeight, from_gguf, quantize_int8

BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34)}
BLOCK |= {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0]}
FP16_FIELDS |= {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
EXACT = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}  # scales already float16: repacking loses nothing


def random_gguf(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random blocks of a GGUF type: every byte random (all codes and packed sub-scales are valid),
    then each block's float16 scale fields set to finite values of a weight's size."""
    elems, size = BLOCK[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // elems, size), dtype=np.uint8)
    for at in FP16_FIELDS[kind]:
        scale = rng.uniform(1e-3, 2e-2, size=blocks.shape[0]).astype(np.float16)
        if kind in ("Q4_1", "Q5_1") and at == 2:
            scale = -scale * 8  # a min: about -8 codes' worth, as real Q4_1 files have
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module", params=kernels.available_isas() or ["none"])
def ops(request):
    if request.param == "none":
        pytest.skip("this CPU has no AVX2: the compute kernels do not run here")
    built = kernels.compute_ops(request.param)
    if built is None:
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler: the kernels cannot be built here")
        pytest.fail(f"a C++ compiler is present but the {request.param} compute kernels did not build")
    return built


@pytest.mark.parametrize("kind", sorted(GGUF_QUANTIZED))
def test_gguf_blocks_repack_to_what_gguf_dequantizes(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, cols = 6, 512
    raw = random_gguf(kind, rows, cols)
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).astype(np.float32))
    weight = from_gguf(raw, kind, rows, cols)
    got = weight.dequantize()
    assert weight.shape == (rows, cols)
    assert weight.bits == (4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8)
    if kind in EXACT:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        # K-quant sub-block scales (float16 x 6-bit integer) are rounded to float16 once: each weight
        # moves by at most 2^-11 of |scale x code| + 2^-11 of |min| <= 2^-10 of the largest weight.
        bound = expected.abs().max() * 2**-10
        assert (got - expected).abs().max() <= bound


def test_concat_widens_mixed_formats_exactly():
    q4k = from_gguf(random_gguf("Q4_K", 4, 256, seed=1), "Q4_K", 4, 256)  # 4-bit, mins
    q6k = from_gguf(random_gguf("Q6_K", 2, 256, seed=2), "Q6_K", 2, 256)  # 8-bit, 16-element groups
    q8 = from_gguf(random_gguf("Q8_0", 3, 256, seed=3), "Q8_0", 3, 256)
    fused = QuantizedWeight.concat([q4k, q6k, q8])
    assert (fused.bits, fused.group, fused.mins is not None) == (8, 16, True)
    expected = torch.cat([q4k.dequantize(), q6k.dequantize(), q8.dequantize()])
    torch.testing.assert_close(fused.dequantize(), expected, rtol=0, atol=0)
    same = QuantizedWeight.concat([q4k, q4k])  # one format: kept as it is
    assert (same.bits, same.group) == (4, 32)


def test_quantize_int8_is_q8_0():
    torch.manual_seed(0)
    w = torch.randn(5, 96) * torch.logspace(-3, 1, 96)  # channels of very different sizes
    q = quantize_int8(w)
    assert q.codes.dtype == torch.int8 and q.scales.shape == (5, 3) and q.mins is None
    assert q.codes.abs().max() <= 127
    step = q.scales.float().repeat_interleave(32, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6 * w.abs()).all()  # within half a step
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int8(torch.randn(4, 40))


def reference_and_bound(x: torch.Tensor, w: torch.Tensor, int16_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ w^T in float64, and the error the kernel may make. Quantized weights (the row-wise integer path
    and the integer panels): x is rounded to int16 codes with step max|x| / 32767 per block of 32, so
    each product moves by at most |w| x half a step; fp32 accumulation adds ~K x 2^-24 relative. fp32
    weights: fp32 accumulation only."""
    ref = x.double() @ w.double().T
    magnitude = x.double().abs() @ w.double().abs().T
    bound = magnitude * 64 * x.shape[1] * 2**-24 + 1e-6
    if int16_x:
        half_step = x.double().abs().view(x.shape[0], -1, 32).amax(-1) / 32767 / 2  # [M, K/32]
        w_blocks = w.double().abs().view(w.shape[0], -1, 32).sum(-1)  # [N, K/32]
        bound = bound + half_step @ w_blocks.T
    return ref, bound


def q_linear(ops, x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None, max_int_rows: int) -> torch.Tensor:
    mins = q.mins if q.mins is not None else torch.empty(0)
    return ops.q_linear(x, q.codes, q.scales, mins, bias if bias is not None else torch.empty(0), q.bits, max_int_rows)


@pytest.mark.parametrize("kind", sorted(GGUF_QUANTIZED))
def test_q_linear_matches_float64(ops, kind):
    elems = BLOCK[kind][0]
    shapes = [(1, 96), (2, 608), (3, 256), (5, 96), (16, 608), (17, 608), (33, 96), (67, 608)]  # (M, K)
    if elems == 256:
        shapes = [(m, 512) for m, _ in shapes[:5]] + [(17, 768), (67, 256)]
    gen = torch.Generator().manual_seed(0)
    # 37, 101: threads split them unevenly, the last panel is partial; 101: several panels
    for (m, k), n in zip(shapes, [37, 48, 101, 48] * 2):
        q = from_gguf(random_gguf(kind, n, k, seed=m), kind, n, k)
        x = torch.randn(m, k, generator=gen) * torch.rand(m, k, generator=gen).pow(4) * 4  # some large entries
        bias = torch.randn(n, generator=gen)
        w = q.dequantize()
        ref, bound = reference_and_bound(x, w, int16_x=True)
        for max_int_rows in (0, 10**6):  # the integer panels at every M; the row-wise path at every M
            got = q_linear(ops, x, q, bias, max_int_rows).double() - bias.double()
            assert got.shape == (m, n)
            assert ((got - ref).abs() <= bound).all(), (kind, m, k, max_int_rows, (got - ref).abs().max())


def test_q_linear_rejects_bad_shapes(ops):
    q = quantize_int8(torch.randn(8, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.q_linear(torch.randn(2, 40), q.codes, q.scales, torch.empty(0), torch.empty(0), 8, 16)
    with pytest.raises(ValueError, match="do not match K"):
        ops.q_linear(torch.randn(2, 96), q.codes, q.scales, torch.empty(0), torch.empty(0), 8, 16)
    with pytest.raises(ValueError, match="float32"):
        ops.q_linear(torch.randn(2, 64).double(), q.codes, q.scales, torch.empty(0), torch.empty(0), 8, 16)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 30, 130])
def test_f32_linear_matches_float64(ops, m):
    """Dot products up to max_dot_rows rows of x, panels past it; 130 rows at K = 576 pass the panel
    path's chunk of x (112 rows there) once."""
    gen = torch.Generator().manual_seed(m)
    for k, n in ((100, 29), (576, 48), (7, 29), (300, 101)):  # K not a multiple of 8 or of the unrolled step; N partial
        w = torch.randn(n, k, generator=gen)
        x = torch.randn(m, k, generator=gen)
        bias = torch.randn(n, generator=gen)
        ref, bound = reference_and_bound(x, w, int16_x=False)
        for max_dot_rows in (4, 10**6):
            got = ops.f32_linear(x, w, bias, max_dot_rows).double() - bias.double()
            assert got.shape == (m, n)
            assert ((got - ref).abs() <= bound).all(), (m, k, max_dot_rows, (got - ref).abs().max())


def test_add_rms_norm(ops):
    gen = torch.Generator().manual_seed(0)
    x, residual, weight = (
        torch.randn(7, 96, generator=gen),
        torch.randn(7, 96, generator=gen),
        torch.rand(96, generator=gen),
    )
    summed = residual + x
    expected = weight * (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5))
    stream = residual.clone()
    got = ops.add_rms_norm(x, stream, weight, 1e-5)
    torch.testing.assert_close(stream, summed, rtol=0, atol=0)  # added in place, exactly
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    alone = ops.add_rms_norm(None, summed.clone(), weight, 1e-5)  # the stream's start: no add
    torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner", [72, 77, 1536])  # the vector loop with and without a scalar tail
def test_silu_mul(ops, inner):
    gate_up = torch.randn(5, 2 * inner, generator=torch.Generator().manual_seed(0)) * 6
    # past exp8's clamp: ~0 and the gate (silu(-200) is -0 with exp8(88.3762) finite or infinite alike)
    gate_up[0, :6] = torch.tensor([-200.0, -88.0, -30.0, 30.0, 88.0, 200.0])
    expected = F.silu(gate_up[:, :inner]) * gate_up[:, inner:]
    # exp8's polynomial: ~1e-7 relative error per exponential, under the tolerance's 1e-5
    torch.testing.assert_close(ops.silu_mul(gate_up), expected, rtol=1e-5, atol=1e-6)


def test_rope_kv_write(ops):
    gen = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, dim, block_size = 6, 4, 2, 16, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    positions = torch.tensor([0, 3, 4, 9, 10, 17])
    rotary = layers.RotaryEmbedding(dim, 32, 10000.0)
    cos, sin = rotary.tables(positions, torch.float32)  # [T, 1, D/2]
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    expected_q = layers.apply_rotary(q.reshape(tokens, heads, dim), cos, sin)
    expected_k = layers.apply_rotary(k.reshape(tokens, kv_heads, dim), cos, sin)
    expected_v = v.reshape(tokens, kv_heads, dim).clone()
    cache = torch.zeros(2, 8, block_size, kv_heads, dim)
    slots = torch.tensor([5, 0, 31, 12, 13, 2])
    ops.rope_kv_write(qkv, heads, kv_heads, cos[:, 0], sin[:, 0], cache, slots)
    torch.testing.assert_close(q.reshape(tokens, heads, dim), expected_q, rtol=1e-6, atol=1e-6)  # rotated in place
    torch.testing.assert_close(cache[0].view(-1, kv_heads, dim)[slots], expected_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache[1].view(-1, kv_heads, dim)[slots], expected_v, rtol=0, atol=0)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert cache[:, :].view(2, 32, -1)[:, untouched].abs().sum() == 0  # nothing else written
    with pytest.raises(ValueError, match="out of range"):
        ops.rope_kv_write(qkv, heads, kv_heads, cos[:, 0], sin[:, 0], cache, torch.tensor([0, 1, 2, 3, 4, 32]))


def test_rope_kv_write_into_a_float16_cache_rounds_as_torch(ops):
    """kv_cache_dtype float16: the same rotation, the keys and values rounded to nearest even on the
    way in, bit for bit what torch's .to(float16) gives."""
    gen = torch.Generator().manual_seed(1)
    tokens, heads, kv_heads, dim = 5, 6, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 40  # past fp16's 2^-10 steps
    rotary = layers.RotaryEmbedding(dim, 64, 10000.0)
    cos, sin = rotary.tables(torch.tensor([1, 2, 7, 30, 31]), torch.float32)
    slots = torch.tensor([3, 9, 0, 14, 15])
    wide, narrow = torch.zeros(2, 4, 4, kv_heads, dim), torch.zeros(2, 4, 4, kv_heads, dim, dtype=torch.float16)
    qkv_wide = qkv.clone()
    ops.rope_kv_write(qkv_wide, heads, kv_heads, cos[:, 0], sin[:, 0], wide, slots)
    ops.rope_kv_write(qkv, heads, kv_heads, cos[:, 0], sin[:, 0], narrow, slots)
    assert torch.equal(qkv, qkv_wide)  # queries, keys and values rotated alike in the QKV output
    assert torch.equal(narrow, wide.to(torch.float16))


@pytest.mark.parametrize("group, block_size, dim", [(3, 16, 64), (2, 4, 20)])
def test_decode_attention_reads_a_float16_cache_exactly(ops, group, block_size, dim):
    """A float16 cache is widened exactly as it is read: the result is the kernel's over the same values
    held in fp32, up to the order of float sums (-ffast-math lets each instantiation order them)."""
    gen = torch.Generator().manual_seed(2)
    heads, num_blocks = 2, 12
    narrow = (torch.randn(2, num_blocks, block_size, heads, dim, generator=gen) * 3).to(torch.float16)
    lens = torch.tensor([1, block_size + 1, 3 * block_size])
    tables = torch.randperm(num_blocks, generator=gen)[:9].view(3, 3)
    q = torch.randn(3, heads, group, dim, generator=gen)
    out = ops.decode_attention_f32(q, narrow, tables, lens, 0.125)
    torch.testing.assert_close(
        out, ops.decode_attention_f32(q, narrow.float(), tables, lens, 0.125), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_is_the_same_however_the_threads_split_a_sequences_heads(ops, dtype):
    """A thread takes its share of the (sequence, KV head) pairs a sequence at a time and reads each block once
    for the heads of that sequence in its share: 3 sequences x 3 KV heads split 9 / 5+4 / 3+3+3 / 3+2+2+2 ways
    cut sequences between threads at different heads, and every head's result is bitwise the same (its
    online softmax does not depend on which other heads share its pass)."""
    gen = torch.Generator().manual_seed(4)
    heads, group, dim, block_size, num_blocks = 3, 3, 64, 16, 24
    cache = (torch.randn(2, num_blocks, block_size, heads, dim, generator=gen) * 3).to(dtype)
    lens = torch.tensor([5, 70, 33])
    tables = torch.randperm(num_blocks, generator=gen)[:15].view(3, 5)
    q = torch.randn(3, heads, group, dim, generator=gen)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results.append(ops.decode_attention_f32(q, cache, tables, lens, 0.125))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_products_write_into_a_given_buffer(ops):
    """q_linear, f32_linear and silu_mul write into `out` (models/layers.py's Workspace) exactly what they
    return without it, on each product path, and refuse a buffer of the wrong shape or type."""
    gen = torch.Generator().manual_seed(1)
    q = from_gguf(random_gguf("Q4_1", 101, 96), "Q4_1", 101, 96)
    for m, max_int_rows in ((3, 10**6), (40, 0)):  # the row-wise path, then the integer panels
        x = torch.randn(m, 96, generator=gen)
        buffer = torch.full((m, 101), float("nan"))
        got = ops.q_linear(x, q.codes, q.scales, q.mins, torch.empty(0), q.bits, max_int_rows, buffer)
        assert got.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(buffer, q_linear(ops, x, q, None, max_int_rows), rtol=0, atol=0)
        gate_up, silu = torch.randn(m, 2 * 101, generator=gen), torch.full((m, 101), float("nan"))
        assert ops.silu_mul(gate_up, out=silu).data_ptr() == silu.data_ptr()
        torch.testing.assert_close(silu, ops.silu_mul(gate_up), rtol=0, atol=0)
    weight = q.dequantize()
    for m, max_dot_rows in ((3, 4), (40, 4)):  # f32_linear's dot products, then its panels
        x = torch.randn(m, 96, generator=gen)
        buffer = torch.full((m, 101), float("nan"))
        assert ops.f32_linear(x, weight, torch.empty(0), max_dot_rows, out=buffer).data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(buffer, ops.f32_linear(x, weight, torch.empty(0), max_dot_rows), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out must be \[M, N\]"):
        ops.f32_linear(x, weight, torch.empty(0), 4, out=torch.empty(m, 102))
    with pytest.raises(ValueError, match=r"out must be \[M, N\]"):
        ops.q_linear(x, q.codes, q.scales, q.mins, torch.empty(0), q.bits, 0, torch.empty(m, 100))
    with pytest.raises(ValueError, match="float32"):
        ops.q_linear(x, q.codes, q.scales, q.mins, torch.empty(0), q.bits, 0, torch.empty(m, 101).double())
    with pytest.raises(ValueError, match=r"out must be \[M, N\] = \[40, 101\]"):  # [T, I]
        ops.silu_mul(gate_up, out=torch.empty(m + 1, 101))


@pytest.mark.parametrize("quantized", [True, False], ids=["int8", "fp32"])
def test_swiglu_reuses_the_workspace_for_large_steps(ops, quantized):
    """Past WORKSPACE_MIN_BYTES the MLP writes its [T, 2I] product, and past it too its [T, I] one, into the
    thread's workspace buffers, the same ones step after step, with the result of the path without
    them; a step's end drops the ones it did not use, release() all."""
    torch.manual_seed(0)
    mlp = layers.SwiGLU(64, 4096)  # fp32 rows: [T, 8192] 32 KiB, [T, 4096] 16 KiB: 32 and 64 rows reach 1 MiB
    for proj in (mlp.gate_up_proj, mlp.down_proj):
        w = torch.randn(proj.out_features, proj.in_features) * 0.05
        if quantized:
            proj.set_quantized(quantize_int8(w))
        else:
            proj.weight.data.copy_(w)
    layers.use_cpu_kernels(mlp, ops)
    workspace = layers.WORKSPACE
    x = torch.randn(70, 64)
    workspace.release()
    mlp(torch.randn(31, 64))  # under the bar: no buffer
    assert workspace.held_bytes() == 0
    got = mlp(x)
    assert workspace.held_bytes() == 70 * (8192 + 4096) * 4
    workspace.end_step()  # a step that used both keeps both
    assert workspace.held_bytes() == 70 * (8192 + 4096) * 4
    buffer = workspace.get("gate_up", 70, 8192)
    mlp(torch.randn(40, 64))  # a smaller step: the same gate_up buffer; its [40, 4096] under the bar
    assert workspace.get("gate_up", 70, 8192).data_ptr() == buffer.data_ptr()
    expected = mlp.down_proj(ops.silu_mul(mlp.gate_up_proj(x)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    workspace.end_step()  # since the last end_step, gate_up was used and silu was not
    assert workspace.held_bytes() == 70 * 8192 * 4
    workspace.end_step()  # a step that used none
    assert workspace.held_bytes() == 0
    mlp(x)
    workspace.release()
    assert workspace.held_bytes() == 0


def test_linear_module_plain_path_is_the_reference():
    """Without the kernels (CUDA, KVSERVE_CPU_KERNELS=0) a quantized Linear expands its weight per
    product: the same result as a dense Linear holding the dequantized weight."""
    q = from_gguf(random_gguf("Q4_1", 24, 64), "Q4_1", 24, 64)
    linear = layers.Linear(64, 24, bias=False)
    linear.set_quantized(q)
    assert linear.weight is None and linear.ops is None
    x = torch.randn(3, 64)
    torch.testing.assert_close(linear(x), F.linear(x, q.dequantize()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        layers.Linear(64, 23).set_quantized(q)


@pytest.mark.parametrize(
    "group, block_size, dim",
    [(1, 4, 64), (3, 16, 64), (3, 16, 20), (2, 16, 128), (5, 32, 48), (4, 8, 80)],
)
def test_decode_attention_f32_matches_the_gather_and_sdpa_path(ops, group, block_size, dim):
    """Block sizes below and above the kernel's 8-token vector step, head dims with and without it. AVX-512
    builds take query heads three at a time in 16-key chunks, values 64 dims at a time: groups of 4 and 5
    (a second pass), 32-token blocks (two chunks each), head dims 48 and 80 (16-dim remainders)."""
    from kvserve.models.attention import AttentionMetadata, block_tables_and_mask, paged_attention

    gen = torch.Generator().manual_seed(group)
    heads, num_blocks = 2, 40
    cache = torch.randn(2, num_blocks, block_size, heads, dim, generator=gen) * 3  # peaked softmaxes too
    lens = [1, 4, 5, 17, 30, 9 * block_size - 3]  # one token, a full block, a block and one, longer contexts
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in lens:
        count = -(-n // block_size)
        tables.append(perm[at : at + count])
        at += count
    q = torch.randn(len(lens), heads * group, dim, generator=gen)
    kv = torch.zeros(len(lens), heads, dim)  # this step's K/V: already in the cache, unused by decodes
    block_tables, mask = block_tables_and_mask(tables, lens, block_size, torch.device("cpu"))
    meta = AttentionMetadata(torch.zeros(len(lens), dtype=torch.long), len(lens), block_tables, mask)
    expected = paged_attention(q, kv, kv, cache, meta, 0.125)  # gather + SDPA
    assert at <= num_blocks
    meta = AttentionMetadata(torch.zeros(len(lens), dtype=torch.long), len(lens), block_tables, mask, compute_ops=ops)
    torch.testing.assert_close(paged_attention(q, kv, kv, cache, meta, 0.125), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside the block table"):
        ops.decode_attention_f32(
            q.view(len(lens), heads, group, dim), cache, block_tables, torch.tensor(lens) + 4, 0.125
        )


def test_the_environment_can_pick_one_instruction_set(monkeypatch):
    """KVSERVE_CPU_KERNELS=avx2 runs the AVX2 build on a machine that has AVX-512 too (to measure one
    kind of machine's path on the other); 0 turns the kernels off; 1 takes the best; anything else is
    refused by name."""
    for isa in ("avx2", "avx512"):
        monkeypatch.setenv("KVSERVE_CPU_KERNELS", isa)
        assert kernels.best_isa() == isa
    monkeypatch.setenv("KVSERVE_CPU_KERNELS", "0")
    assert kernels.compute_ops() is None
    monkeypatch.setenv("KVSERVE_CPU_KERNELS", "1")
    flags = kernels.cpu_flags()
    expected = (
        "avx512" if kernels.ISA_NEEDS["avx512"] <= flags else "avx2" if kernels.ISA_NEEDS["avx2"] <= flags else None
    )
    assert kernels.best_isa() == expected
    monkeypatch.setenv("KVSERVE_CPU_KERNELS", "avx")
    with pytest.raises(ValueError, match="KVSERVE_CPU_KERNELS='avx': expected one of 0, 1, avx2, avx512"):
        kernels.compute_ops()
    if "avx2" in kernels.available_isas() and shutil.which("c++"):
        monkeypatch.setenv("KVSERVE_CPU_KERNELS", "avx2")
        ops = kernels.compute_ops()
        assert ops is None or ops is kernels.compute_ops("avx2")
