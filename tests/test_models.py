"""Model correctness against Hugging Face transformers on the same weights.

Tolerances: both sides compute in fp32 on the CPU; only the summation order of
matrix products and attention differs (fused QKV, paged gather, SDPA kernels),
which moves logits of magnitude ~30 by ~1e-5. 2e-3 absolute leaves headroom
for other BLAS builds while still catching any real layout error (a wrong rope
permutation or a missing bias moves logits by whole units).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_same_or_near_tie,
    gguf_folder_and_file,
    hf_greedy,
    hf_greedy_with_logprobs,
    save_tiny_model,
    write_gguf,
)

from kvserve import LLM, SamplingParams
from kvserve.models.attention import AttentionMetadata, PrefillSpan
from kvserve.models.llama import LlamaForCausalLM
from kvserve.models.loader import load_weights

LOGIT_TOL = 2e-3


def our_prefill_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    config, weights = load_weights(path)
    model = LlamaForCausalLM(config, config.max_position_embeddings)
    model.load_weights(weights)
    n = len(token_ids)
    caches = model.allocate_kv_cache(-(-n // 16), 16, torch.float32)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), num_decode_tokens=0, prefills=[PrefillSpan(0, n, n)])
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(token_ids), torch.arange(n), caches, meta))


@pytest.fixture(scope="module")
def hf_default():
    from transformers import AutoModelForCausalLM

    folder, file = gguf_folder_and_file()
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm_default():
    return LLM(kv_cache_memory="256MiB")


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


def test_default_model_logits_match_transformers(hf_default, llm_default):
    ids = llm_default.tokenizer.encode("Why is the sky blue? Light from the sun is scattered by")
    ours = our_prefill_logits(llm_default.engine.model_path, ids)
    with torch.no_grad():
        ref = hf_default(torch.tensor([ids])).logits[0]
    diff = (ours - ref).abs().max().item()
    print(f"default model: max |logit diff| = {diff:.2e} over {len(ids)} positions")
    assert diff < LOGIT_TOL


def test_default_model_greedy_64_tokens_equals_transformers(hf_default, llm_default):
    tok = llm_default.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=64, min_tokens=64, logprobs=2)
    outs = llm_default.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ref, ref_top2 = hf_greedy_with_logprobs(hf_default, prompt, 64)
        got = out.outputs[0].token_ids
        assert len(got) == 64
        # the kernels round x to int16 per block of 32 (logits within ~2e-2 of fp32): a divergence
        # is allowed only where transformers' own top two were a near-tie
        assert_same_or_near_tie(got, ref, ref_top2)
    llm_default.engine.check_idle()


@pytest.mark.parametrize("kind", ["qwen2", "llama", "llama3", "mistral"])
def test_tiny_random_models_match_transformers_from_safetensors(tmp_path, kind):
    hf = save_tiny_model(str(tmp_path), kind, shard=kind == "llama")
    if kind == "llama":
        assert (tmp_path / "model.safetensors.index.json").exists()  # sharded checkpoint path covered
    ids = [5, 17, 200, 3, 99, 42, 7, 150, 11, 300, 8, 64, 128, 1, 77, 23, 310, 45]
    ours = our_prefill_logits(str(tmp_path), ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < LOGIT_TOL

    llm = LLM(model=str(tmp_path), kv_cache_memory="16MiB", max_num_batched_tokens=64)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24, min_tokens=24, logprobs=2))[0]
    assert out.outputs[0].text == ""  # no tokenizer files: token ids only
    assert_same_or_near_tie(out.outputs[0].token_ids, hf_greedy(hf, ids, 24))
    llm.engine.check_idle()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_through_gguf_loader(tmp_path, arch):
    hf = save_tiny_model(str(tmp_path / "hf"), "llama" if arch == "llama" else "qwen2", seed=3)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, hf, arch)
    ids = [9, 8, 7, 100, 200, 300, 5, 6, 150, 151, 152, 3]
    ours = our_prefill_logits(path, ids)
    # the GGUF holds F16 matrices: compare against the same F16-rounded weights
    hf_half = type(hf)(hf.config)
    state = {k: (v.half().float() if v.dim() == 2 and ".layers." in k else v) for k, v in hf.state_dict().items()}
    if not hf.config.tie_word_embeddings:
        state["lm_head.weight"] = state["lm_head.weight"].half().float()
    hf_half.load_state_dict(state)
    with torch.no_grad():
        ref = hf_half.eval()(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < LOGIT_TOL


def test_pickle_checkpoints_are_refused(tmp_path):
    save_tiny_model(str(tmp_path), "llama")
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        _, weights = load_weights(str(tmp_path))
        next(iter(weights))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match="config.json lacks"):
        load_weights(str(tmp_path))
