"""Embeddings (LLM.embed, SamplingParams.embed) against transformers: the final hidden states (after the
last norm) mean-pooled and L2-normalized, whatever the engine does around them (chunked prefill, a
one-token chunk, a prefix already cached, preemption, generations in the same steps)."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model

from kvserve import LLM, SamplingParams

# A tiny model's fp32 path against transformers' fp32 forward: the same sums in another order.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    return folder, save_tiny_model(folder, "llama")


def reference(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        hidden = hf_model.model(torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(0), dim=0)


def assert_close(embedding: list[float], expected: torch.Tensor) -> None:
    got = torch.tensor(embedding)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOLERANCE
    assert abs(got.norm().item() - 1) < 1e-6


PROMPTS = [
    list(range(5, 42)),  # 37 tokens: chunks of 16, 16 and 5
    [3],  # one token: the step's decode path
    [9, 9, 9, 4],
    list(range(100, 117)),  # 17 tokens: a chunk of 16, then a one-token chunk
]


def test_embed_matches_transformers_through_chunked_prefill(tiny):
    folder, hf_model = tiny
    llm = LLM(folder, kv_cache_memory="16MiB", max_num_batched_tokens=16)
    for prompt, embedding in zip(PROMPTS, llm.embed(PROMPTS)):
        assert_close(embedding, reference(hf_model, prompt))
    assert llm.get_stats()["num_chunked_prefills"] > 0
    llm.engine.check_idle()


def test_embed_computes_cached_prefixes_and_shares_steps_with_generation(tiny):
    folder, hf_model = tiny
    llm = LLM(folder, kv_cache_memory="16MiB")
    prompt = list(range(7, 71))  # 4 whole blocks, cached by the generation below
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0))
    generate = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    embed = SamplingParams(max_tokens=0, embed=True)
    outs = llm.generate([prompt, prompt, [1, 2, 3]], [embed, generate, embed])
    assert_close(outs[0].embedding, reference(hf_model, prompt))
    assert_close(outs[2].embedding, reference(hf_model, [1, 2, 3]))
    assert outs[0].outputs[0].token_ids == [] and outs[1].embedding is None
    assert len(outs[1].outputs[0].token_ids) == 8
    llm.engine.check_idle()


def test_embed_survives_preemption(tiny):
    folder, hf_model = tiny
    block_bytes = 16 * 3 * 2 * 2 * 16 * 4  # tokens x layers x (K, V) x kv heads x head dim x fp32
    llm = LLM(folder, kv_cache_memory=8 * block_bytes, max_num_batched_tokens=16, enable_prefix_caching=False)
    generations = [list(range(20 + i, 40 + i)) for i in range(3)]
    long_prompt = list(range(200, 260))
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] * 3
    outs = llm.generate([*generations, long_prompt], [*params, SamplingParams(max_tokens=0, embed=True)])
    assert llm.get_stats()["num_preemptions"] > 0
    assert_close(outs[3].embedding, reference(hf_model, long_prompt))
    llm.engine.check_idle()


@pytest.mark.parametrize("kwargs", [dict(max_tokens=16), dict(max_tokens=0, n=2)])
def test_embed_params_refuse_generation(kwargs):
    with pytest.raises(ValueError, match="embed needs max_tokens == 0 and n == 1"):
        SamplingParams(embed=True, **kwargs)
