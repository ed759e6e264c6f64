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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from kvserve.kv.quant import QuantizedKVCache, dequantize, quantize


@dataclass
class PrefillSpan:
    start: int  # index of the span's first token in the flat batch
    num_tokens: int  # query tokens in this step
    context_len: int  # tokens attended after this step's K/V are written (earlier + this chunk)
    block_ids: torch.Tensor | None = None  # [ceil(context_len / block_size)], only when there is earlier context
    mask: torch.Tensor | None = None  # [1, 1, num_tokens, context_len] bool, True = attend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each token's new K/V
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None = None  # [Nd, max_blocks]
    decode_mask: torch.Tensor | None = None  # [Nd, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillSpan] = field(default_factory=list)


KVCache = torch.Tensor | QuantizedKVCache  # one layer's cache; a plain tensor is [2, num_blocks, block_size, Hkv, D]


def write_kv(kv_cache: KVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] go to their T slots (quantized first for an int8/fp8 cache); nothing else is touched."""
    num_kv_heads, head_dim = k.shape[1:]
    if isinstance(kv_cache, QuantizedKVCache):
        for i, x in enumerate((k, v)):
            if kv_cache.rotation is not None:
                x = x.float() @ kv_cache.rotation
            q, scale = quantize(x, kv_cache.data.dtype, kv_cache.qmax)
            kv_cache.data[i].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, q)
            kv_cache.scales[i].view(-1, num_kv_heads).index_copy_(0, slot_mapping, scale)
        return
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_kv(kv_cache: KVCache, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V of whole blocks, in order: each [len(block_ids) * block_size, Hkv, D] in `dtype`.
    index_select on whole blocks is a row memcpy, ~3x faster on the CPU than advanced indexing; a
    quantized cache is dequantized here, for the gathered blocks only, and stays rotated (see
    kv/quant.py: the caller rotates queries and un-rotates outputs instead)."""
    if isinstance(kv_cache, QuantizedKVCache):
        data = kv_cache.data.index_select(1, block_ids)  # [2, n, bs, Hkv, D]
        scales = kv_cache.scales.index_select(1, block_ids)  # [2, n, bs, Hkv]
        kv = dequantize(data, scales, dtype).flatten(1, 2)  # [2, n * bs, Hkv, D]
        return kv[0], kv[1]
    head_shape = kv_cache.shape[-2:]
    k = kv_cache[0].index_select(0, block_ids).view(-1, *head_shape)
    v = kv_cache[1].index_select(0, block_ids).view(-1, *head_shape)
    return k, v


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
    # Against a rotated (quantized) cache, queries are rotated and outputs rotated back.
    rotation = getattr(kv_cache, "rotation", None)
    rotation = rotation.to(q.dtype) if rotation is not None else None
    q_cached = q @ rotation if rotation is not None else q  # queries that attend to cached K

    nd = meta.num_decode_tokens
    if nd:
        keys, values = gather_kv(kv_cache, meta.decode_block_tables.flatten(), q.dtype)
        keys = keys.view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)  # [Nd, Hkv, L, D]
        values = values.view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)
        queries = q_cached[:nd].view(nd, num_kv_heads, group, head_dim)  # [Nd, Hkv, G, D]
        attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.decode_mask, scale=scale)
        attn = attn.reshape(nd, num_heads, head_dim)
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
        queries = q_cached[rows].transpose(0, 1).unsqueeze(0)
        keys, values = gather_kv(kv_cache, span.block_ids, q.dtype)
        keys = keys[:ctx].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
        values = values[:ctx].transpose(0, 1).unsqueeze(0)
        attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=span.mask, scale=scale, enable_gqa=True)
        attn = attn[0].transpose(0, 1)  # [Tq, Hq, D]
        out[rows] = attn @ rotation.T if rotation is not None else attn
    return out.view(num_tokens, num_heads * head_dim)
