"""Paged attention over the block-structured KV cache, in plain PyTorch (CPU and CUDA).

The flat batch of one step is ordered decodes first, then prefill chunks:

    tokens  [ d0 d1 ... d(Nd-1) | p0 p0 p0 ... | p1 p1 ... ]
             one query each       one span per prefilling request

Decodes are attended in one batched call: each request's blocks are gathered by
its block table into [Nd, Hkv, L, D] (L = the longest context in the batch,
rounded up to whole blocks) and masked by context length, so the cost grows
with the tokens actually attended, never with max_model_len. Grouped-query heads
are folded into the query-length axis ([Nd, Hkv, G, D]), so K/V are never
repeated per query head. Prefill spans attend causally: a span with no earlier
context uses its own fresh K/V; a span that continues a cached prefix or an
earlier chunk gathers its blocks and uses an offset causal mask.

Cascade decode: when decodes' block tables start with the same blocks (a system
prompt served from the prefix cache), those blocks are gathered once and all
those decodes' queries attend to them in one product; each decode's remaining
blocks are attended as above, and the two partial results are merged exactly
through their log-sum-exps (DecodeCascade, cascade_decode_attention).

A quantized cache (kv/quant.py) is read dequantized, except each sequence's last two blocks, which
come from its recent window (WindowBlocks). An int8 cache on the CPU is read by compiled kernels
(kvserve/kernels) when they could be built: decodes attend straight from the codes and the window
(no gather at all), and prefill spans and cascades gather and dequantize in one pass. Without
them, the plain PyTorch path below does the same in passes.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch.nn import functional as F

from kvserve import kernels
from kvserve.kv.quant import (
    WINDOW_BLOCKS,
    QuantizedKVCache,
    as_bytes,
    quantize_key_blocks,
    quantize_values,
    window_first_block,
)

# Plain caches the compiled kernels (kvserve/kernels) write and read for an fp32 model: fp32, and float16
# (kv_cache_dtype float16) converted on the way in and out.
KERNEL_KV_DTYPES = (torch.float32, torch.float16)


@dataclass
class PrefillSpan:
    start: int  # index of the span's first token in the flat batch
    num_tokens: int  # query tokens in this step
    context_len: int  # tokens attended after this step's K/V are written (earlier + this chunk)
    block_ids: torch.Tensor | None = None  # [ceil(context_len / block_size)], only when there is earlier context
    mask: torch.Tensor | None = None  # [1, 1, num_tokens, context_len] bool, True = attend
    window: WindowBlocks | None = None  # its blocks read from its window, in a quantized cache


@dataclass
class WindowBlocks:
    """Blocks of a quantized cache read from their sequence's recent window instead of their codes
    (kv/quant.py): in a gathered block table, row rows[i], column cols[i] reads window entry
    entries[i] (slot * WINDOW_BLOCKS + block index % WINDOW_BLOCKS, of window[plane].flatten(0, 1))."""

    rows: torch.Tensor  # [n]
    cols: torch.Tensor  # [n]
    entries: torch.Tensor  # [n]

    @classmethod
    def of_rows(
        cls,
        lens: list[int],
        slots: list[int],
        first_written: list[int],
        block_size: int,
        device: torch.device,
        skipped: list[int] | None = None,
    ) -> WindowBlocks | None:
        """Row i of a table holds a context of lens[i] tokens of the sequence in window slot slots[i],
        which wrote its slot from position first_written[i] on; skipped[i] leading blocks of it are
        left out of the row (a cascade's shared prefix, never in a window)."""
        rows, cols, entries = [], [], []
        for i, (n, slot, first) in enumerate(zip(lens, slots, first_written)):
            skip = skipped[i] if skipped else 0
            for b in range(window_first_block(n, first, block_size), -(-n // block_size)):
                rows.append(i)
                cols.append(b - skip)
                entries.append(slot * WINDOW_BLOCKS + b % WINDOW_BLOCKS)
        if not rows:
            return None
        return cls(*(torch.tensor(x, device=device) for x in (rows, cols, entries)))


@dataclass
class KeyWrites:
    """How one step's K and V enter a quantized cache (kv/quant.py). Each block that this step fills
    has its keys quantized from block_size source rows: those written by earlier steps from the
    window, the rest from this step's keys. Then the tokens that fall in the sequence's window after
    the step go there, K and V alike. Rows of a window plane viewed [-1, Hkv, D] are
    (slot * WINDOW_BLOCKS + block index % WINDOW_BLOCKS) * block_size + offset."""

    full_blocks: torch.Tensor  # [C] block ids filled this step
    from_window_dst: torch.Tensor  # rows of the [C * block_size] source that come from the window ...
    from_window_src: torch.Tensor  # ... and those window rows
    from_step_dst: torch.Tensor  # rows of the source that come from this step's keys ...
    from_step_src: torch.Tensor  # ... and those tokens' indices in the step
    to_window_src: torch.Tensor  # tokens in their sequence's window after the step ...
    to_window_dst: torch.Tensor  # ... and their window rows

    @classmethod
    def plan(
        cls, spans: list[tuple[int, int, int, list[int], int, int]], block_size: int, device: torch.device
    ) -> KeyWrites:
        """spans: per request in the step, (index of its first token in the step, first position, end
        position, block table, window slot, first position it wrote into that slot); the request
        writes positions [first, end)."""
        bs = block_size
        full: list[int] = []
        from_window_dst, from_window_src, from_step_dst, from_step_src, to_window_src, to_window_dst = (
            [] for _ in range(6)
        )
        for flat, start, end, table, slot, first_written in spans:
            window_from = window_first_block(end, first_written, bs)
            for b in range(start // bs, -(-end // bs)):
                entry_row = (slot * WINDOW_BLOCKS + b % WINDOW_BLOCKS) * bs
                if (b + 1) * bs <= end:  # filled this step
                    base = len(full) * bs
                    full.append(table[b])
                    for offset in range(bs):
                        pos = b * bs + offset
                        if pos < start:
                            from_window_dst.append(base + offset)
                            from_window_src.append(entry_row + offset)
                        else:
                            from_step_dst.append(base + offset)
                            from_step_src.append(flat + pos - start)
                if b >= window_from:
                    for pos in range(max(start, b * bs), min(end, (b + 1) * bs)):
                        to_window_src.append(flat + pos - start)
                        to_window_dst.append(entry_row + pos % bs)
        rows = (full, from_window_dst, from_window_src, from_step_dst, from_step_src, to_window_src, to_window_dst)
        return cls(*(torch.tensor(r, dtype=torch.long, device=device) for r in rows))


@dataclass
class CascadeGroup:
    rows: torch.Tensor  # [n] decode rows (indices < Nd) whose block tables all start with block_ids; n >= 2
    # [P] the shared leading blocks, P >= 1, all full and before every row's own block and window
    block_ids: torch.Tensor


@dataclass
class DecodeCascade:
    """The decode batch split at shared prefixes (cascade attention). Each group's prefix blocks are
    gathered once and attended by all its rows together; each row's suffix (its blocks after its
    group's prefix, or its whole table if it is in no group) is attended as usual. A prefix ends
    before the block that holds any of its rows' new token, so every suffix holds at least that token.
    Optional: a backend may ignore it and read decode_block_tables / decode_mask (MLA does)."""

    groups: list[CascadeGroup]
    suffix_block_tables: torch.Tensor  # [Nd, max_suffix_blocks], padded with block 0
    suffix_mask: torch.Tensor  # [Nd, 1, 1, max_suffix_blocks * block_size] bool, True = in context
    suffix_window: WindowBlocks | None = None  # windows (always in the suffix) of a quantized cache

    # Least share of the decode batch's gathered blocks that the cascade must save. Its attention
    # (a product and softmax per KV head, to get log-sum-exps) costs ~15% more per token than SDPA's
    # on the CPU, applied to every decode's suffix; measured break-even near 1/4 (16 decodes x 1,050
    # tokens: 1 shared block 10% slower, 16 blocks even, 62 blocks 15-20% faster).
    min_saving = 0.25

    @classmethod
    def build(
        cls,
        tables: list[list[int]],
        lens: list[int],
        block_size: int,
        device: torch.device,
        windows: tuple[list[int], list[int]] | None = None,
    ) -> DecodeCascade | None:
        """From the decodes' block tables and context lengths (the new token included). Groups
        decodes by their first block; a group of >= 2 whose tables share >= 1 leading block becomes
        a CascadeGroup. None when no group qualifies or the groups save less than `min_saving` of
        the blocks. The shared run is cut before the block holding any member's new token (position
        len - 1): that block is the member's own (a shared block is full and read-only), and the cut
        guarantees that every suffix is non-empty. windows: for a quantized cache, each decode's
        window slot and first position written into it (WindowBlocks.of_rows); a prefix is also
        cut before any member's window blocks, which must not be read as codes."""
        by_first: dict[int, list[int]] = {}
        for i, table in enumerate(tables):
            by_first.setdefault(table[0], []).append(i)
        prefix_len = [0] * len(tables)  # blocks of each row attended as its group's prefix
        groups: list[CascadeGroup] = []
        for rows in by_first.values():
            if len(rows) < 2:
                continue
            members = [tables[i] for i in rows]
            low, high = min(members), max(members)  # a set's common prefix is that of its min and max
            limit = min((lens[i] - 1) // block_size for i in rows)
            if windows is not None:
                limit = min(limit, *(window_first_block(lens[i], windows[1][i], block_size) for i in rows))
            n = 0
            while n < limit and low[n] == high[n]:
                n += 1
            if n == 0:
                continue
            for i in rows:
                prefix_len[i] = n
            groups.append(CascadeGroup(torch.tensor(rows, device=device), torch.tensor(low[:n], device=device)))
        saved = sum((len(g.rows) - 1) * len(g.block_ids) for g in groups)  # blocks no longer gathered
        if not groups or saved < cls.min_saving * sum(-(-n // block_size) for n in lens):
            return None
        suffix_tables = [t[p:] for t, p in zip(tables, prefix_len)]
        suffix_lens = [n - p * block_size for n, p in zip(lens, prefix_len)]
        cascade = cls(groups, *block_tables_and_mask(suffix_tables, suffix_lens, block_size, device))
        if windows is not None:
            cascade.suffix_window = WindowBlocks.of_rows(lens, *windows, block_size, device, prefix_len)
        return cascade


def block_tables_and_mask(
    tables: list[list[int]], lens: list[int], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:  # [N, width] padded with block 0, [N, 1, 1, width * block_size] bool
    """Decode block tables as one padded tensor, and the mask of the context positions (< len) in them."""
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
    mask = torch.arange(width * block_size, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    return padded, mask[:, None, None]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each token's new K/V
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None = None  # [Nd, max_blocks]
    decode_mask: torch.Tensor | None = None  # [Nd, 1, 1, max_blocks * block_size] bool
    decode_cascade: DecodeCascade | None = None  # when decodes share leading blocks
    prefills: list[PrefillSpan] = field(default_factory=list)
    key_writes: KeyWrites | None = None  # quantized caches only
    decode_window: WindowBlocks | None = None  # quantized caches only: decodes' blocks read from windows
    compute_ops: ModuleType | None = None  # the compiled CPU kernels (kvserve/kernels), for an fp32 model on the CPU
    _decode_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def decode_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per decode, [Nd] int64 each: its context length, its window slot (-1: none), and the first
        block it reads from the window (blocks from there on come from ring entry block % 2 of the
        slot; past the table when none): what the fused int8 decode kernel reads. Once per step."""
        if self._decode_rows is None:
            lens = self.decode_mask[:, 0, 0].sum(-1)
            slots = torch.full_like(lens, -1)
            first = torch.full_like(lens, self.decode_block_tables.shape[1])
            if (w := self.decode_window) is not None:
                slots[w.rows] = w.entries // WINDOW_BLOCKS
                first.scatter_reduce_(0, w.rows, w.cols, "amin")
            self._decode_rows = (lens, slots, first)
        return self._decode_rows


KVCache = torch.Tensor | QuantizedKVCache  # one layer's cache; a plain tensor is [2, num_blocks, block_size, Hkv, D]


def write_kv(kv_cache: KVCache, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """This step's k, v [T, Hkv, D] go to their T slots (meta.slot_mapping); nothing else is touched.
    A quantized cache quantizes values per token at once, keys per channel a block at a time, and
    keeps the recent window, as meta.key_writes says (kv/quant.py)."""
    num_kv_heads, head_dim = k.shape[1:]
    slots = meta.slot_mapping
    if not isinstance(kv_cache, QuantizedKVCache):  # a float16 cache of an fp32 model: rounded here
        kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(kv_cache.dtype))
        kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(kv_cache.dtype))
        return
    rotated = v.float() @ kv_cache.rotation
    q, scale = quantize_values(rotated, kv_cache.data.dtype, kv_cache.qmax)
    as_bytes(kv_cache.data[1]).view(-1, num_kv_heads, head_dim).index_copy_(0, slots, as_bytes(q))
    kv_cache.value_scales[0].view(-1, *scale.shape[1:]).index_copy_(0, slots, scale)
    writes = meta.key_writes
    if writes is None:
        raise ValueError("a quantized KV cache is written with meta.key_writes (KeyWrites.plan)")
    window = kv_cache.window.view(2, -1, num_kv_heads, head_dim)
    # Keys are quantized from the window's precision whichever step wrote them, so a block's codes do
    # not depend on how its tokens were split into steps.
    k = to_window(k, window.dtype)
    num_full = writes.full_blocks.shape[0]
    if num_full:  # before the window is written: a chunk's later block may reuse an entry
        block_size = kv_cache.data.shape[2]
        source = torch.empty(num_full * block_size, num_kv_heads, head_dim, dtype=k.dtype, device=k.device)
        source.index_copy_(0, writes.from_window_dst, window[0].index_select(0, writes.from_window_src))
        source.index_copy_(0, writes.from_step_dst, k.index_select(0, writes.from_step_src))
        codes, key_scale, center = quantize_key_blocks(
            source.view(num_full, block_size, num_kv_heads, head_dim), kv_cache.data.dtype, kv_cache.qmax
        )
        as_bytes(kv_cache.data[0]).index_copy_(0, writes.full_blocks, as_bytes(codes))
        kv_cache.key_params[0].index_copy_(0, writes.full_blocks, key_scale)
        kv_cache.key_params[1].index_copy_(0, writes.full_blocks, center)
    if writes.to_window_src.shape[0]:
        window[0].index_copy_(0, writes.to_window_dst, k.index_select(0, writes.to_window_src))
        values = to_window(rotated.index_select(0, writes.to_window_src), window.dtype)
        window[1].index_copy_(0, writes.to_window_dst, values)


def to_window(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the window's dtype, clamped to fp16's range when that is the window's (kv/quant.py
    window_dtype): a key past it would be infinite and poison every score of its head."""
    if dtype == torch.float16 and x.dtype != torch.float16:
        x = x.clamp(-65504.0, 65504.0)
    return x.to(dtype)


class GatherBuffers(threading.local):
    """Reused memory for what attention gathers from the cache, per thread: one buffer per role, grown
    to the largest request and never shrunk, so a step's gathers allocate nothing on the CPU.

    Why: a layer's gather is tens of MB (16 decodes x 1,050 tokens: 26 MB of fp32 K and V) that are
    dead once the layer has attended. Allocated fresh, glibc maps them from the OS and hands them back
    on free, so every layer of every step page-faults through all of it again: that was half the
    decode step on the project's 2-core CPU (16 x 1,050-token contexts: ~230 ms, ~105 ms without).
    The peak memory is the same either way; what stays held after a peak is its gather. CUDA's
    caching allocator already reuses memory, so there every request is a plain allocation."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized [shape] tensor, valid until the next request for `role` on this thread."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        buffer = self.buffers.get((role, dtype))
        if buffer is None or buffer.numel() < numel:
            size = max(numel, buffer.numel() * 5 // 4 if buffer is not None else 0)  # contexts grow a block at a time
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                buffer = torch.empty(size, dtype=dtype, device=device)
            self.buffers[(role, dtype)] = buffer
        return buffer[:numel].view(shape)


gather_buffers = GatherBuffers()


def gather_kv(
    kv_cache: KVCache, block_ids: torch.Tensor, dtype: torch.dtype, window: WindowBlocks | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V of whole blocks, in order: each [len(block_ids) * block_size, Hkv, D] in `dtype`
    (see `gather_blocks`)."""
    keys, values = gather_blocks(kv_cache, block_ids[None], dtype, window)
    return keys[0], values[0]


def gather_blocks(
    kv_cache: KVCache, block_tables: torch.Tensor, dtype: torch.dtype, window: WindowBlocks | None = None
) -> tuple[torch.Tensor, torch.Tensor]:  # K, V [N, n * block_size, Hkv, D], token-major as stored
    """Each row of block_tables [N, n] gathered, into `gather_buffers` (valid until the next gather on
    this thread). An int8 cache on the CPU goes through the compiled gather_dequant when it is built
    (kvserve/kernels): one pass, the same values (keys up to one rounding); what follows is the
    plain path. index_select along dim 0 of each plane is a row memcpy per block (~3x faster on the
    CPU than advanced indexing, and several times faster than index_select along dim 1 of [2, ...]).

    A quantized cache is dequantized here, for the gathered blocks only (values stay rotated, see
    kv/quant.py: the caller un-rotates outputs instead): its int8/fp8 codes (a quarter of fp32's
    bytes) are gathered and converted into the model dtype in one pass, then keys take their
    block's per-channel scale and center and values their per-token scale, in place. Measured on
    the CPU (per-token format, one multiply per plane), converting in one pass and scaling in place cost about what an fp32 gather does,
    where the same product written as one mixed-dtype multiply was 2x slower, and allocating its
    result fresh (page faults, see GatherBuffers) 20x; keys now take one multiply-add. Last, the
    blocks of `window` are copied over from the sequences' windows."""
    rows = block_tables.shape[0]
    block_ids = block_tables.flatten()
    if (ops := fused_int8_ops(kv_cache)) is not None:  # one pass: codes in, dequantized values out
        data = kv_cache.data
        kv = gather_buffers.get("kv", (2, block_ids.shape[0], *data.shape[2:]), dtype, data.device)
        ops.gather_dequant(data, kv_cache.key_params, kv_cache.value_scales, block_ids, kv)
    elif isinstance(kv_cache, QuantizedKVCache):
        data = index_select_reused("data", as_bytes(kv_cache.data), block_ids)  # [2, N * n, bs, Hkv, D] codes
        data = data.view(kv_cache.data.dtype)  # int8, or fp8 gathered as bytes
        key_params = index_select_reused("key_params", kv_cache.key_params, block_ids)  # [2, N * n, Hkv, D]
        value_scales = index_select_reused("value_scales", kv_cache.value_scales, block_ids)  # [1, N * n, bs, Hkv, G]
        kv = gather_buffers.get("kv", data.shape, dtype, data.device).copy_(data)  # exact: |q| <= 127 (448)
        scale, center = key_params[0].unsqueeze(1), key_params[1].unsqueeze(1)  # [N * n, 1, Hkv, D]
        if dtype == torch.float32:
            torch.addcmul(center, kv[0], scale, out=kv[0])  # one pass, in place
        else:  # in fp32, rounded once: a 16-bit code x scale would be rounded before the center is added
            kv[0].copy_(torch.addcmul(center, data[0].float(), scale))
        values = kv[1].unflatten(-1, (value_scales.shape[-1], -1))  # [N * n, bs, Hkv, G, D / G], a view
        values.mul_(value_scales[0].unsqueeze(-1))  # one product, rounded once
    else:
        kv = index_select_reused("kv", kv_cache, block_ids)  # [2, N * n, bs, Hkv, D]
        if kv.dtype != dtype:  # a float16 cache of an fp32 model: widened exactly
            kv = gather_buffers.get("kv_wide", kv.shape, dtype, kv.device).copy_(kv)
    if isinstance(kv_cache, QuantizedKVCache) and window is not None:  # an open block's window rows past
        # the sequence's end hold older K/V (an earlier sequence's, or its own from two blocks back: finite
        # model outputs), which the caller's mask excludes
        at = window.rows * block_tables.shape[1] + window.cols  # gathered block indices
        for plane in range(2):  # index_copy_ of whole blocks: a memcpy each, unlike indexed assignment
            entries = kv_cache.window[plane].flatten(0, 1).index_select(0, window.entries)  # [n, bs, Hkv, D]
            kv[plane].index_copy_(0, at, entries.to(dtype))
    kv = kv.view(2, rows, -1, *kv.shape[3:])  # [2, N, n * bs, Hkv, D]
    return kv[0], kv[1]


def plain_cache_kernel_reads(kv_cache: KVCache, compute_ops, dtype: torch.dtype) -> bool:
    """Whether the compiled decode attention (paged_attention.cpp) reads this cache: a plain fp32 or fp16
    cache under an fp32 model, with the compute kernels built."""
    return (
        compute_ops is not None
        and isinstance(kv_cache, torch.Tensor)
        and dtype == torch.float32
        and kv_cache.dtype in KERNEL_KV_DTYPES
    )


def decode_reads_in_place(kv_cache: KVCache, compute_ops, dtype: torch.dtype) -> bool:
    """Whether paged_attention's decodes read this cache's blocks where they lie (the compiled kernels:
    an int8 cache, or a plain fp32/fp16 one under an fp32 model) instead of gathering them."""
    return fused_int8_ops(kv_cache) is not None or plain_cache_kernel_reads(kv_cache, compute_ops, dtype)


def fused_int8_ops(kv_cache: KVCache):  # -> torch.ops.kvserve | None
    """The compiled kernels (kvserve/kernels), when they can read this cache: int8 on the CPU."""
    if isinstance(kv_cache, QuantizedKVCache) and kv_cache.data.dtype == torch.int8 and kv_cache.data.is_cpu:
        return kernels.cpu_ops()
    return None


def index_select_reused(role: str, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [planes, num_blocks, ...] -> [planes, len(block_ids), ...] in `gather_buffers`."""
    planes = cache.shape[0]
    out = gather_buffers.get(role, (planes, block_ids.shape[0], *cache.shape[2:]), cache.dtype, cache.device)
    for plane in range(planes):
        torch.index_select(cache[plane], 0, block_ids, out=out[plane])
    return out


def attention_with_lse(
    queries: torch.Tensor,  # [B, Hkv, M, D]: M queries per KV head (grouped heads folded in)
    keys: torch.Tensor,  # [B, L, Hkv, D], token-major as gathered
    values: torch.Tensor,  # [B, L, Hkv, D]
    scale: float,
    mask: torch.Tensor | None = None,  # [B, 1, L] bool, True = attend, at least one True per row; None: all
) -> tuple[torch.Tensor, torch.Tensor]:  # out [B, Hkv, M, D], lse [B, Hkv, M] fp32
    """Softmax attention that also returns each query's log-sum-exp of scores, which SDPA does not
    expose: two results over disjoint key sets then merge exactly (`merge_attention`).

    One batched product per KV head, straight on the gathered layout (a head's keys are a [B, L, D]
    view with row stride Hkv * D, which BLAS reads in place; batching all heads in one product
    would first copy K and V to head-major order). On the CPU it costs ~15-100% more per key than
    SDPA (more for short contexts, where its small per-head products dominate), so it is kept to
    the cascade. Softmax statistics are fp32 whatever the model dtype; the output is normalized
    after the product with V ([M, D] divisions instead of [M, L])."""
    batch, num_kv_heads, num_queries, head_dim = queries.shape
    out = queries.new_empty(batch, num_kv_heads, num_queries, head_dim)
    lse = torch.empty(batch, num_kv_heads, num_queries, dtype=torch.float32, device=queries.device)
    queries = queries * scale
    for h in range(num_kv_heads):
        scores = torch.bmm(queries[:, h], keys[:, :, h].transpose(1, 2)).float()  # [B, M, L]
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        top = scores.amax(dim=-1, keepdim=True)  # [B, M, 1]
        weights = scores.sub_(top).exp_()  # [B, M, L], unnormalized probabilities in [0, 1]
        total = weights.sum(dim=-1, keepdim=True)  # [B, M, 1], >= 1
        out[:, h] = torch.bmm(weights.to(values.dtype), values[:, :, h]) / total.to(values.dtype)  # [B, M, D]
        lse[:, h] = (top + total.log()).squeeze(-1)
    return out, lse


def merge_attention(
    out1: torch.Tensor,  # [..., D]
    lse1: torch.Tensor,  # [...]
    out2: torch.Tensor,
    lse2: torch.Tensor,
) -> torch.Tensor:  # [..., D]
    """Attention over the union of two disjoint key sets from the attention over each:
    (out1 e^lse1 + out2 e^lse2) / (e^lse1 + e^lse2), with both weights taken relative to
    lse = log(e^lse1 + e^lse2) so that nothing overflows."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = (lse1 - lse).exp().unsqueeze(-1).to(out1.dtype)
    w2 = (lse2 - lse).exp().unsqueeze(-1).to(out2.dtype)
    return out1 * w1 + out2 * w2


def cascade_decode_attention(
    queries: torch.Tensor,  # [Nd, Hkv, G, D]
    kv_cache: KVCache,
    cascade: DecodeCascade,
    scale: float,
) -> torch.Tensor:  # [Nd, Hkv, G, D]
    """Decode attention with each group's shared prefix gathered once (see DecodeCascade). Every
    prefix token is in every member's context, so the group's queries attend to it together and
    unmasked, grouped heads and members folded into one query axis: [n * G, D] x [D, P * bs] per
    KV head. Suffixes are attended per row, masked; the two parts merge by their log-sum-exps."""
    nd, num_kv_heads, group, head_dim = queries.shape
    keys, values = gather_blocks(
        kv_cache, cascade.suffix_block_tables, queries.dtype, cascade.suffix_window
    )  # [Nd, S * bs, Hkv, D]
    out, lse = attention_with_lse(
        queries, keys, values, scale, cascade.suffix_mask[:, 0]
    )  # [Nd, Hkv, G, D], [Nd, Hkv, G]
    for g in cascade.groups:
        n = g.rows.shape[0]
        keys, values = gather_blocks(kv_cache, g.block_ids[None], queries.dtype)  # [1, P * bs, Hkv, D]
        rows = queries[g.rows].transpose(0, 1).reshape(1, num_kv_heads, n * group, head_dim)  # [1, Hkv, n * G, D]
        p_out, p_lse = attention_with_lse(rows, keys, values, scale)  # [1, Hkv, n * G, D], [1, Hkv, n * G]
        p_out = p_out.view(num_kv_heads, n, group, head_dim).transpose(0, 1)  # [n, Hkv, G, D]
        p_lse = p_lse.view(num_kv_heads, n, group).transpose(0, 1)  # [n, Hkv, G]
        out[g.rows] = merge_attention(p_out, p_lse, out[g.rows], lse[g.rows])
    return out


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D] this step's keys (already written to the cache)
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq * D]
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    # A quantized cache holds values rotated (kv/quant.py): outputs that read it are rotated back.
    rotation = getattr(kv_cache, "rotation", None)
    rotation = rotation.to(q.dtype) if rotation is not None else None

    nd = meta.num_decode_tokens
    if nd:
        queries = q[:nd].view(nd, num_kv_heads, group, head_dim)  # [Nd, Hkv, G, D]
        if meta.decode_cascade is not None:
            attn = cascade_decode_attention(queries, kv_cache, meta.decode_cascade, scale)
        elif (ops := fused_int8_ops(kv_cache)) is not None:  # reads the int8 blocks in place, no gather
            lens, window_slots, window_from = meta.decode_rows()
            attn = torch.empty_like(queries)
            ops.decode_attention(
                queries.contiguous(),
                kv_cache.data,
                kv_cache.key_params,
                kv_cache.value_scales,
                kv_cache.window,
                meta.decode_block_tables,
                lens,
                window_slots,
                window_from,
                scale,
                attn,
            )
        elif plain_cache_kernel_reads(kv_cache, meta.compute_ops, q.dtype):
            # a plain fp32 or fp16 cache read in place, block by block: no gather, no padding (paged_attention.cpp)
            lens = meta.decode_rows()[0]
            attn = meta.compute_ops.decode_attention_f32(
                queries.contiguous(), kv_cache, meta.decode_block_tables, lens, scale
            )
        else:
            keys, values = gather_blocks(
                kv_cache, meta.decode_block_tables, q.dtype, meta.decode_window
            )  # [Nd, L, Hkv, D]
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [Nd, Hkv, L, D]
            attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.decode_mask, scale=scale)
        attn = attn.reshape(nd, num_heads, head_dim)
        if nd == num_tokens and rotation is None:  # decodes only: the result as it is, no copy
            return attn.reshape(num_tokens, num_heads * head_dim)
        out[:nd] = attn @ rotation.T if rotation is not None else attn

    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_tokens)
        if span.block_ids is None:  # no earlier context: attend to this chunk's own fresh K/V
            queries = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, Tq, D]
            keys = k[rows].transpose(0, 1).unsqueeze(0)  # [1, Hkv, Tq, D]
            values = v[rows].transpose(0, 1).unsqueeze(0)
            attn = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale, enable_gqa=True)
            out[rows] = attn[0].transpose(0, 1)
            continue
        ctx = span.context_len
        queries = q[rows].transpose(0, 1).unsqueeze(0)
        keys, values = gather_kv(kv_cache, span.block_ids, q.dtype, span.window)
        keys = keys[:ctx].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
        values = values[:ctx].transpose(0, 1).unsqueeze(0)
        attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=span.mask, scale=scale, enable_gqa=True)
        attn = attn[0].transpose(0, 1)  # [Tq, Hq, D]
        out[rows] = attn @ rotation.T if rotation is not None else attn
    return out.view(num_tokens, num_heads * head_dim)
