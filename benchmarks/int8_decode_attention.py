"""Decode attention per layer over fp32 and int8 KV caches, the way a decode step reads them.

32 decodes x 384 tokens of SmolLM2's shape (3 KV heads x 3 query heads each, head dim 64, 16-token
blocks scattered over 4,190 blocks), one cache per layer for 30 layers, cycled, so that blocks come
from memory as in the engine rather than from the CPU's caches. Times (best of 5) for:

- fp32: gather the blocks, then SDPA (attention.py's plain path);
- int8 plain: gather the codes, dequantize in passes, then SDPA (KVSERVE_CPU_KERNELS=0);
- int8 gather kernel: kv_dequant.cpp's one-pass dequantizing gather, then SDPA;
- int8 decode kernel: kv_dequant.cpp's decode attention straight from the codes.

    python benchmarks/int8_decode_attention.py
"""

from __future__ import annotations

import os
import time

import torch
from torch.nn import functional as F

import kvserve.kernels as kernels
from kvserve.kv.quant import QuantizedKVCache
from kvserve.models.attention import AttentionMetadata, WindowBlocks, block_tables_and_mask, gather_blocks

DECODES, CONTEXT, BLOCK, KV_HEADS, GROUP, DIM, LAYERS, BLOCKS = 32, 384, 16, 3, 3, 64, 30, 4190
CPU = torch.device("cpu")


def main() -> None:
    ops = kernels.cpu_ops()
    if ops is None:
        raise SystemExit("kvserve's CPU kernels are not available here (see the log)")
    torch.manual_seed(0)
    quantized, plain = [], []
    for _ in range(LAYERS):
        cache = QuantizedKVCache.allocate("int8", BLOCKS, BLOCK, KV_HEADS, DIM, DECODES, torch.float32, CPU)
        cache.data.random_(-127, 128)
        cache.key_params.uniform_(0.01, 0.1)
        cache.value_scales.uniform_(0.01, 1)
        cache.window.normal_()
        quantized.append(cache)
        plain.append(torch.randn(2, BLOCKS, BLOCK, KV_HEADS, DIM))
    order = torch.randperm(BLOCKS).tolist()
    per_row = CONTEXT // BLOCK
    tables = [order[i * per_row : (i + 1) * per_row] for i in range(DECODES)]
    lens = [CONTEXT - 3] * DECODES  # every last block open
    block_tables, mask = block_tables_and_mask(tables, lens, BLOCK, CPU)
    window = WindowBlocks.of_rows(lens, list(range(DECODES)), [0] * DECODES, BLOCK, CPU)  # last two blocks
    meta = AttentionMetadata(torch.zeros(DECODES, dtype=torch.long), DECODES, block_tables, mask, decode_window=window)
    context_lens, slots, window_from = meta.decode_rows()
    q = torch.randn(DECODES, KV_HEADS, GROUP, DIM)
    out = torch.empty_like(q)

    def gathered(caches: list, kernels_on: bool) -> None:
        os.environ["KVSERVE_CPU_KERNELS"] = "1" if kernels_on else "0"
        for cache in caches:
            k, v = gather_blocks(cache, block_tables, torch.float32, window)
            F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=DIM**-0.5)

    def decode_kernel() -> None:
        for c in quantized:
            ops.decode_attention(
                q,
                c.data,
                c.key_params,
                c.value_scales,
                c.window,
                block_tables,
                context_lens,
                slots,
                window_from,
                DIM**-0.5,
                out,
            )

    runs = {
        "fp32: gather + SDPA": lambda: gathered(plain, True),
        "int8 plain: gather, dequantize in passes, SDPA": lambda: gathered(quantized, False),
        "int8 gather kernel + SDPA": lambda: gathered(quantized, True),
        "int8 decode kernel": decode_kernel,
    }
    print(f"{DECODES} decodes x {CONTEXT} tokens, {LAYERS} layers cycled, {torch.get_num_threads()} threads")
    for name, run in runs.items():
        run()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        print(f"{name:48s} {best / LAYERS * 1e3:6.2f} ms per layer")
    os.environ["KVSERVE_CPU_KERNELS"] = "1"


if __name__ == "__main__":
    main()
