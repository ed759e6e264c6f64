"""Automatic prefix caching end to end: outputs equal caching off, hits counted, nothing leaks."""

from __future__ import annotations

import pytest
from helpers import assert_same_or_near_tie

from kvserve import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def llms():
    on = LLM(kv_cache_memory="64MiB", max_num_batched_tokens=64)
    off = LLM(kv_cache_memory="64MiB", max_num_batched_tokens=64, enable_prefix_caching=False)
    return on, off


def shared_prefix_prompts(tokenizer) -> list[list[int]]:
    system = tokenizer.encode(
        "You are a careful assistant. Answer in one sentence, cite no sources, and stay polite. " * 3
    )
    prompts = []
    for cut in (16, 32, 37, 48, 61, len(system)):  # block-aligned (16, 32, 48) and not
        for tail in ([], tokenizer.encode(" What is rain?"), tokenizer.encode(" Name a color.")):
            prompts.append(system[:cut] + tail)
    return prompts


def test_outputs_equal_caching_off_and_hits_counted(llms):
    on, off = llms
    prompts = shared_prefix_prompts(on.tokenizer)
    reference = off.generate(prompts, PARAMS)
    before = on.get_stats()
    first = on.generate(prompts, PARAMS)
    second = on.generate(prompts, PARAMS)  # everything cached now, including whole prompts
    for ref, a, b in zip(reference, first, second):
        ids, lps = ref.outputs[0].token_ids, ref.outputs[0].logprobs
        assert_same_or_near_tie(a.outputs[0].token_ids, ids, lps)
        assert_same_or_near_tie(b.outputs[0].token_ids, ids, lps)
    stats = on.get_stats()
    assert stats["prefix_cache_hits"] > before["prefix_cache_hits"]
    for prompt, out in zip(prompts, second):
        # a fully cached prompt still computes its last token: hits stop one token short, in whole blocks
        assert out.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    off.engine.check_idle()
    on.engine.check_idle()
    assert all(b.ref_count == 0 for b in on.engine.kv.pool.blocks)


def test_request_arriving_while_prefix_is_prefilled(llms):
    on, off = llms
    tok = on.tokenizer
    long_prefix = tok.encode("The history of the printing press begins with movable type in East Asia and " * 6)
    a = long_prefix + tok.encode(" Summarize.")
    b = long_prefix + tok.encode(" Translate it.")
    reference = off.generate([a, b], PARAMS)
    engine = on.engine
    engine.kv.pool.reset_prefix_cache()
    id_a = engine.add_request(a, PARAMS)
    engine.step()  # token budget 64: `a` is only partly prefilled
    assert engine.groups[id_a].sequences[0].num_computed_tokens < len(a)
    id_b = engine.add_request(b, PARAMS)
    while engine.has_unfinished():
        engine.step()
    out_a, out_b = engine.pop_finished(id_a), engine.pop_finished(id_b)
    assert out_b.num_cached_tokens >= 64  # the blocks `a` had finished were reused
    for out, ref in zip((out_a, out_b), reference):
        assert_same_or_near_tie(out.outputs[0].token_ids, ref.outputs[0].token_ids, ref.outputs[0].logprobs)
    engine.check_idle()


def test_multi_turn_reuses_previous_answer(llms):
    on, _ = llms
    tok = on.tokenizer
    turn1 = [{"role": "user", "content": "Tell me about the moon in three sentences."}]
    first = on.chat(turn1, SamplingParams(temperature=0, max_tokens=48))[0]
    turn2 = turn1 + [
        {"role": "assistant", "content": first.outputs[0].text},
        {"role": "user", "content": "And the sun?"},
    ]
    second = on.chat(turn2, SamplingParams(temperature=0, max_tokens=4))[0]
    # the cached tokens cover the first turn's prompt and part of its generated answer
    assert second.num_cached_tokens > len(tok.apply_chat_template(turn1))
    on.engine.check_idle()


def test_preempted_request_resumes_from_cache():
    llm = LLM(kv_cache_memory=12 * 16 * 46080, max_num_batched_tokens=256)
    tok = llm.tokenizer
    prompts = [tok.encode(f"Story number {i}: once upon a time there was a dragon who") for i in range(8)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    stats = llm.get_stats()
    assert stats["num_preemptions"] > 0
    # the prompts differ from their third token on, so every hit is a resumed request finding the full
    # blocks it computed before it was preempted
    assert stats["prefix_cache_hits"] > 0
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    llm.engine.check_idle()
