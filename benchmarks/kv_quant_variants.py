"""Which 8-bit KV formats keep SmolLM2's greedy continuations? An emulation, for choosing a format.

Each variant rounds K/V as they are written into a full-precision cache (quantize, then dequantize
at once), so no kernel is needed to compare formats; greedy continuations (default 96 prompts x 64
tokens from tests/data/english_text.txt) are compared with the unrounded cache's. The shipped int8
format (kv/quant.py) is the one marked "(shipped)": keys per channel over each full block, [min, max]
mapped onto the codes; values per token and 32 channels, symmetric, Hadamard-rotated; each
sequence's last two blocks (the open one and the full one before it) read in fp16 from its window.
Before the window, the open block's keys alone were kept exact ("... rot-sym32 (window-less)"); before
that, kvserve shipped keys rounded like values with one scale per head ("rot-sym64"). The "shipped
keys; ..." variants change that format's values, or when its blocks are rounded (a block's values
rounded only when it fills, like its keys; the last two or four blocks kept exact or in fp16). The prompts of a smaller --num-prompts are among those of a larger one, and
--num-prompts 32 gives the 32 of kv_quant_quality.py's greedy check.

    python benchmarks/kv_quant_variants.py [--num-prompts 96] [--variants SUBSTRING ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import kv_quant_quality as quality
import torch

from kvserve import LLM, SamplingParams
from kvserve.kv.quant import hadamard
from kvserve.models.attention import AttentionMetadata, write_kv

H = hadamard(64)
Rounding = Callable[[torch.Tensor], torch.Tensor]  # [T, Hkv, D] -> same, rounded


def symmetric(group: int) -> Rounding:
    def rounding(x: torch.Tensor) -> torch.Tensor:
        g = x.unflatten(-1, (-1, group))
        scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        return ((g / scale).round().clamp(-127, 127) * scale).flatten(-2)

    return rounding


def asymmetric(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / 255
    return ((x - lo) / scale).round().clamp(0, 255) * scale + lo


def grouped(rounding: Rounding, group: int) -> Rounding:
    """`rounding` applied to each group of `group` channels on its own."""
    return lambda x: rounding(x.unflatten(-1, (-1, group))).flatten(-2)


def rotated(rounding: Rounding) -> Rounding:
    return lambda x: rounding(x @ H) @ H.T


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


PER_TOKEN = rotated(symmetric(64))
BlockRounding = Callable[[torch.Tensor], torch.Tensor]  # [block_size, Hkv, D] -> same


def channel_symmetric(block: torch.Tensor) -> torch.Tensor:
    scale = block.abs().amax(0, keepdim=True).clamp_min(1e-8) / 127
    return (block / scale).round().clamp(-127, 127) * scale


def channel_range(block: torch.Tensor) -> torch.Tensor:
    """The shipped key format (kv/quant.py quantize_key_blocks), as a rounding."""
    high, low = block.amax(0, keepdim=True), block.amin(0, keepdim=True)
    center, scale = (high + low) / 2, ((high - low) / 254).clamp_min(1e-8)
    return ((block - center) / scale).round().clamp(-127, 127) * scale + center


class Variant(NamedTuple):
    keys: Rounding  # at write
    values: Rounding  # at write
    key_blocks: BlockRounding | None = None  # a full block's keys, when rounded (see exact_full_blocks)
    value_blocks: Rounding | None = None  # a full block's values (per token), at the same moment
    exact_full_blocks: int = 0  # full blocks kept exact after the open one: 1 rounds a block once the next fills


SHIPPED_VALUES = rotated(symmetric(32))
VARIANTS: dict[str, Variant] = {
    "fp16": Variant(lambda x: x.half().float(), lambda x: x.half().float()),
    "bf16": Variant(lambda x: x.bfloat16().float(), lambda x: x.bfloat16().float()),
    "sym64 (plain per-head)": Variant(symmetric(64), symmetric(64)),
    "rot-sym64 (per token, shipped before)": Variant(PER_TOKEN, PER_TOKEN),
    "rot-sym64, keys only": Variant(PER_TOKEN, identity),
    "rot-sym64, values only": Variant(identity, PER_TOKEN),
    "rot-sym32 (2 scales per head)": Variant(rotated(symmetric(32)), rotated(symmetric(32))),
    "rot-sym16 (4 scales per head)": Variant(rotated(symmetric(16)), rotated(symmetric(16))),
    "rot-asym64 (min/max)": Variant(rotated(asymmetric), rotated(asymmetric)),
    "keys per channel per block, symmetric; values rot-sym64": Variant(identity, PER_TOKEN, channel_symmetric),
    "keys per channel per block, [min, max]; values exact": Variant(identity, identity, channel_range),
    "keys per channel per block, [min, max]; values rot-sym64": Variant(identity, PER_TOKEN, channel_range),
    "keys per channel per block, [min, max]; values rot-sym32 (window-less)": Variant(
        identity, SHIPPED_VALUES, channel_range
    ),
    # Changes to the window-less format (keys per channel per block, [min, max]), for the >= 90% target:
    "shipped keys; values rot-sym32, open block exact too": Variant(identity, identity, channel_range, SHIPPED_VALUES),
    "shipped keys; values rot-sym16": Variant(identity, rotated(symmetric(16)), channel_range),
    "shipped keys; values rot-sym16, open block exact too": Variant(
        identity, identity, channel_range, rotated(symmetric(16))
    ),
    "shipped keys; values rot-asym32 (min/max per 32 channels)": Variant(
        identity, rotated(grouped(asymmetric, 32)), channel_range
    ),
    "shipped keys; values rot-sym32; last two blocks exact (K and V)": Variant(
        identity, identity, channel_range, SHIPPED_VALUES, exact_full_blocks=1
    ),
    "shipped keys; values rot-sym32; last two blocks in fp16 (K and V) (shipped)": Variant(
        lambda x: x.half().float(), lambda x: x.half().float(), channel_range, SHIPPED_VALUES, exact_full_blocks=1
    ),
    "shipped keys; values rot-sym32; last four blocks in fp16 (K and V)": Variant(
        lambda x: x.half().float(), lambda x: x.half().float(), channel_range, SHIPPED_VALUES, exact_full_blocks=3
    ),
    "shipped keys; values rot-sym32; last four blocks exact (K and V)": Variant(
        identity, identity, channel_range, SHIPPED_VALUES, exact_full_blocks=3
    ),
    "shipped keys; values rot-sym32; last two blocks' keys exact, values at write": Variant(
        identity, SHIPPED_VALUES, channel_range, exact_full_blocks=1
    ),
}


def filled_blocks(meta: AttentionMetadata, block_size: int, behind: int) -> list[int]:
    """The blocks to round after this step's write: for every block of a sequence whose last slot
    this step writes, the block `behind` blocks before it in the sequence (if any)."""
    slots = meta.slot_mapping.tolist()
    spans = []  # (sequence's block table, or None for a first chunk, flat start, first position, tokens)
    if meta.num_decode_tokens:
        lens = meta.decode_mask.flatten(1).sum(1).tolist()
        for i, (table, n) in enumerate(zip(meta.decode_block_tables.tolist(), lens)):
            spans.append((table, i, n - 1, 1))
    for span in meta.prefills:
        table = span.block_ids.tolist() if span.block_ids is not None else None
        spans.append((table, span.start, span.context_len - span.num_tokens, span.num_tokens))
    blocks = []
    for table, flat, first, count in spans:
        if table is None:  # the first chunk of a prompt (first == 0): its blocks are its slots'
            table = [slots[flat + j] // block_size for j in range(0, count, block_size)]
        for pos in range(first, first + count):
            if pos % block_size == block_size - 1 and pos // block_size >= behind:
                blocks.append(table[pos // block_size - behind])
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument(
        "--variants", nargs="+", metavar="SUBSTRING", help="run only the variants whose name contains one of these"
    )
    args = parser.parse_args()
    variants = {
        name: v for name, v in VARIANTS.items() if args.variants is None or any(s in name for s in args.variants)
    }
    if not variants:
        parser.error(f"no variant matches {args.variants}; variants: {list(VARIANTS)}")

    llm = LLM(kv_cache_memory="512MiB", max_num_batched_tokens=64, enable_prefix_caching=False)
    with open(quality.TEXT) as f:
        ids = llm.tokenizer.encode(f.read(), add_special_tokens=False)
    prompts = quality.continuation_prompts(llm, ids, args.num_prompts)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    ref = llm.generate(prompts, params, use_tqdm=False)
    for name, variant in variants.items():

        def rounded_write(cache, k, v, meta, variant=variant):
            write_kv(cache, variant.keys(k.float()).to(k.dtype), variant.values(v.float()).to(v.dtype), meta)
            if variant.key_blocks is None and variant.value_blocks is None:
                return
            # a full block rounded once its last slot (or, with exact_full_blocks, the next block's) is
            # written; the open block (and the exact_full_blocks before it) stay unrounded
            for block in sorted(set(filled_blocks(meta, cache.shape[2], variant.exact_full_blocks))):
                if variant.key_blocks is not None:
                    cache[0, block] = variant.key_blocks(cache[0, block].float()).to(cache.dtype)  # [bs, Hkv, D]
                if variant.value_blocks is not None:
                    cache[1, block] = variant.value_blocks(cache[1, block].float()).to(cache.dtype)

        same = quality.identical_with_cache_write(llm, prompts, params, ref, rounded_write)
        print(f"{name:78s} {same:3d}/{len(prompts)} identical ({100 * same / len(prompts):.0f}%)", flush=True)


if __name__ == "__main__":
    main()
