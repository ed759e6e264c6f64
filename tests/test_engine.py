"""Engine invariants on the default model: batching, preemption and chunked prefill never change
greedy output, and no KV block leaks."""

from __future__ import annotations

import random

import pytest
from helpers import assert_same_or_near_tie

from kvserve import LLM, SamplingParams

NUM_TOKENS = 12


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    rng = random.Random(0)
    words = (
        "the sky is blue because light scatters in air and water reflects it while clouds drift slowly over "
        "mountains rivers cities and quiet fields where farmers grow wheat corn and barley in long summer days"
    ).split()
    prompts = []
    for i in range(count):
        length = 3 + (i * 7) % 60  # 3..62 words: many lengths, block-aligned and not
        prompts.append(tokenizer.encode(" ".join(rng.choice(words) for _ in range(length))))
    return prompts


GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def reference():
    """Each prompt generated alone (max_num_seqs=1), the reference for every invariance test."""
    llm = LLM(kv_cache_memory="64MiB", max_num_seqs=1)
    prompts = make_prompts(llm.tokenizer, 32)
    outs = llm.generate(prompts, GREEDY)
    llm.engine.check_idle()
    return prompts, [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def check_against_reference(outs, reference_outputs):
    for out, (ref_ids, ref_lps) in zip(outs, reference_outputs):
        assert len(out.outputs[0].token_ids) == NUM_TOKENS
        assert_same_or_near_tie(out.outputs[0].token_ids, ref_ids, ref_lps)


def test_batched_equals_alone(reference):
    prompts, ref = reference
    llm = LLM(kv_cache_memory="64MiB", enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    check_against_reference(outs, ref)
    llm.engine.check_idle()


def test_preemption_keeps_outputs(reference):
    prompts, ref = reference
    # ~6 blocks of 16 tokens per request; 24 blocks hold only a few requests at once
    llm = LLM(kv_cache_memory=24 * 16 * 46080, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert llm.get_stats()["num_preemptions"] > 0
    check_against_reference(outs, ref)
    llm.engine.check_idle()


def test_chunked_prefill_keeps_outputs(reference):
    prompts, ref = reference
    llm = LLM(kv_cache_memory="64MiB", max_num_batched_tokens=24, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert llm.get_stats()["num_chunked_prefills"] > 0
    check_against_reference(outs, ref)
    llm.engine.check_idle()
