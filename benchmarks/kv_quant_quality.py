"""Quality of the int8 KV cache against full precision on the default model, in one run.

1. Perplexity over a fixed local English text (tests/data/english_text.txt, ~4,700 tokens, written for
   this project), scored through the engine's prompt logprobs with a small token budget, so that
   nearly every attended key and value is read back from the (quantized) cache as in decoding.
2. Greedy continuations of 32 prompts x 64 tokens: the share identical to full precision, and where
   the others first diverge (position, and the full-precision logprob gap between the top two
   candidates there).

    python benchmarks/kv_quant_quality.py [--kv-cache-dtype int8] [--json out.json] [--rounding-floor]

--rounding-floor also scores the same greedy continuations with the full-precision cache rounded to
float16 and to bfloat16 as it is written (what a GPU's 16-bit KV cache holds): how often SmolLM2's
near-tie greedy choices flip from rounding alone, the floor any 8-bit format is measured against.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Callable

import torch

import kvserve.models.llama as llama_model
from kvserve import LLM, SamplingParams
from kvserve.models.attention import write_kv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "tests", "data", "english_text.txt")


def perplexity(llm: LLM, token_ids: list[int]) -> float:
    out = llm.generate([token_ids], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    lps = [entry[tok] for entry, tok in zip(out.prompt_logprobs[1:], token_ids[1:])]
    return math.exp(-sum(lps) / len(lps))


def continuation_prompts(llm: LLM, token_ids: list[int], count: int, length: int = 48) -> list[list[int]]:
    rng = random.Random(0)
    starts = sorted(rng.sample(range(0, len(token_ids) - length), count))
    return [token_ids[s : s + length] for s in starts]


def identical_with_cache_write(
    llm: LLM, prompts: list[list[int]], params: SamplingParams, ref: list, cache_write: Callable[..., None]
) -> int:
    """How many of llm's continuations of `prompts` equal `ref` when the model writes its KV cache
    through `cache_write` (write_kv's signature; it may call write_kv itself) instead. The model's
    cache write is patched for the duration of this call only."""
    write = llama_model.write_kv
    llama_model.write_kv = cache_write
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llama_model.write_kv = write
    return sum(r.outputs[0].token_ids == g.outputs[0].token_ids for r, g in zip(ref, got))


def identical_when_rounded(llm: LLM, prompts: list[list[int]], params: SamplingParams, ref: list) -> dict:
    """Greedy agreement with `ref` when every K/V written to llm's (full-precision) cache is first
    rounded to float16 or bfloat16."""
    result = {}
    for dtype in (torch.float16, torch.bfloat16):

        def rounded_write(cache, k, v, meta, dtype=dtype):
            write_kv(cache, k.to(dtype).to(k.dtype), v.to(dtype).to(v.dtype), meta)

        result[str(dtype).removeprefix("torch.")] = identical_with_cache_write(llm, prompts, params, ref, rounded_write)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-cache-dtype", default="int8")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--num-tokens", type=int, default=64)
    parser.add_argument("--max-tokens-scored", type=int, default=0, help="score only this many tokens (0: all)")
    parser.add_argument("--rounding-floor", action="store_true", help="also fp16- and bf16-rounded KV")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (fp8 needs cuda)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto (fp32 on the CPU, bf16 on CUDA), ...")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    common = dict(kv_cache_memory="512MiB", max_num_batched_tokens=64, device=args.device, dtype=args.dtype)
    full = LLM(**common)
    quant = LLM(**common, kv_cache_dtype=args.kv_cache_dtype)
    with open(TEXT) as f:
        ids = full.tokenizer.encode(f.read(), add_special_tokens=False)
    if args.max_tokens_scored:
        ids = ids[: args.max_tokens_scored]
    ppl_full, ppl_quant = perplexity(full, ids), perplexity(quant, ids)

    prompts = continuation_prompts(full, ids, args.num_prompts)
    params = SamplingParams(temperature=0, max_tokens=args.num_tokens, ignore_eos=True, logprobs=2)
    ref = full.generate(prompts, params, use_tqdm=False)
    got = quant.generate(prompts, params, use_tqdm=False)
    identical = 0
    divergences = []
    for r, g in zip(ref, got):
        a, b = r.outputs[0].token_ids, g.outputs[0].token_ids
        if a == b:
            identical += 1
            continue
        i = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
        top = sorted(r.outputs[0].logprobs[i].values(), reverse=True)
        divergences.append({"position": i, "top2_gap": top[0] - top[1]})

    result = {
        "kv_cache_dtype": args.kv_cache_dtype,
        "tokens_scored": len(ids) - 1,
        "perplexity_full": ppl_full,
        "perplexity_quant": ppl_quant,
        "perplexity_change_pct": 100 * (ppl_quant / ppl_full - 1),
        "identical_sequences": identical,
        "num_sequences": len(prompts),
        "divergences": divergences,
    }
    print(
        f"text: {len(ids)} tokens; perplexity full {ppl_full:.4f}, {args.kv_cache_dtype} {ppl_quant:.4f} "
        f"({result['perplexity_change_pct']:+.2f}%)"
    )
    print(
        f"greedy {args.num_prompts} x {args.num_tokens}: {identical}/{len(prompts)} identical "
        f"({100 * identical / len(prompts):.0f}%)"
    )
    for d in divergences:
        print(f"  diverged at token {d['position']}, full-precision top-2 logprob gap {d['top2_gap']:.3f}")
    if args.rounding_floor:
        result["identical_when_rounded"] = identical_when_rounded(full, prompts, params, ref)
        for dtype, same in result["identical_when_rounded"].items():
            print(f"full-precision cache rounded to {dtype}: {same}/{len(prompts)} identical")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
