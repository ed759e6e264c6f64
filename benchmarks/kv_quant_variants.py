"""Which 8-bit KV formats keep SmolLM2's greedy continuations? An emulation, for choosing a format.

Each variant rounds K/V as they are written into a full-precision cache (quantize, then dequantize
at once), so no kernel is needed to compare formats; greedy continuations (default 96 prompts x 64
tokens from tests/data/english_text.txt) are compared with the unrounded cache's. The shipped int8
format (kv/quant.py) is the last one: keys per channel over each full block, [min, max] mapped onto
the codes, the open block unrounded; values per token and 32 channels, symmetric, Hadamard-rotated.
The int8 format kvserve shipped before it rounds keys like values with one scale per head ("rot-sym64").

    python benchmarks/kv_quant_variants.py [--num-prompts 96]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import kv_quant_quality as quality
import torch

from kvserve import LLM, SamplingParams
from kvserve.kv.quant import hadamard
from kvserve.models.attention import write_kv

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


def rotated(rounding: Rounding) -> Rounding:
    return lambda x: rounding(x @ H) @ H.T


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


PER_TOKEN = rotated(symmetric(64))
# name: (keys rounding, values rounding, how keys are rounded per channel over each full block, if so)
BlockRounding = Callable[[torch.Tensor], torch.Tensor]  # [block_size, Hkv, D] -> same


def channel_symmetric(block: torch.Tensor) -> torch.Tensor:
    scale = block.abs().amax(0, keepdim=True).clamp_min(1e-8) / 127
    return (block / scale).round().clamp(-127, 127) * scale


def channel_range(block: torch.Tensor) -> torch.Tensor:
    """The shipped key format (kv/quant.py quantize_key_blocks), as a rounding."""
    high, low = block.amax(0, keepdim=True), block.amin(0, keepdim=True)
    center, scale = (high + low) / 2, ((high - low) / 254).clamp_min(1e-8)
    return ((block - center) / scale).round().clamp(-127, 127) * scale + center


VARIANTS: dict[str, tuple[Rounding, Rounding, BlockRounding | None]] = {
    "fp16": (lambda x: x.half().float(), lambda x: x.half().float(), None),
    "bf16": (lambda x: x.bfloat16().float(), lambda x: x.bfloat16().float(), None),
    "sym64 (plain per-head)": (symmetric(64), symmetric(64), None),
    "rot-sym64 (per token, shipped before)": (PER_TOKEN, PER_TOKEN, None),
    "rot-sym64, keys only": (PER_TOKEN, identity, None),
    "rot-sym64, values only": (identity, PER_TOKEN, None),
    "rot-sym32 (2 scales per head)": (rotated(symmetric(32)), rotated(symmetric(32)), None),
    "rot-sym16 (4 scales per head)": (rotated(symmetric(16)), rotated(symmetric(16)), None),
    "rot-asym64 (min/max)": (rotated(asymmetric), rotated(asymmetric), None),
    "keys per channel per block, symmetric; values rot-sym64": (identity, PER_TOKEN, channel_symmetric),
    "keys per channel per block, [min, max]; values exact": (identity, identity, channel_range),
    "keys per channel per block, [min, max]; values rot-sym64": (identity, PER_TOKEN, channel_range),
    "keys per channel per block, [min, max]; values rot-sym32 (shipped)": (
        identity,
        rotated(symmetric(32)),
        channel_range,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=96)
    args = parser.parse_args()

    llm = LLM(kv_cache_memory="512MiB", max_num_batched_tokens=64, enable_prefix_caching=False)
    with open(quality.TEXT) as f:
        ids = llm.tokenizer.encode(f.read(), add_special_tokens=False)
    prompts = quality.continuation_prompts(llm, ids, args.num_prompts)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    ref = llm.generate(prompts, params, use_tqdm=False)
    for name, (keys, values, key_blocks) in VARIANTS.items():

        def rounded_write(cache, k, v, meta, keys=keys, values=values, key_blocks=key_blocks):
            write_kv(cache, keys(k.float()).to(k.dtype), values(v.float()).to(v.dtype), meta)
            if key_blocks is not None:  # a block's keys rounded per channel once its last slot is written;
                slots, block_size = meta.slot_mapping, cache.shape[2]  # the open block stays unrounded
                for block in torch.unique(slots[slots % block_size == block_size - 1] // block_size).tolist():
                    cache[0, block] = key_blocks(cache[0, block])  # [block_size, Hkv, D]

        same = quality.identical_with_cache_write(llm, prompts, params, ref, rounded_write)
        print(f"{name:58s} {same:3d}/{len(prompts)} identical ({100 * same / len(prompts):.0f}%)", flush=True)


if __name__ == "__main__":
    main()
