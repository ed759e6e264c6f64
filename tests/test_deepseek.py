"""DeepSeek-V2/V3 (multi-head latent attention, MoE) against Hugging Face transformers on the same weights.

Tiny random-weight models are built with transformers and saved as checkpoints (routed experts per
expert, no tokenizer files). Both sides compute in fp32 on the CPU; logits agree to ~1e-5, so any
layout error (rope interleave, yarn mscale, a router detail) shows as a difference of whole units.

Torch runs single-threaded here: these models are so small that two threads on a busy 2-core
machine spend ~100x longer synchronising than computing.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import hf_greedy, save_tiny_deepseek

from kvserve import LLM, SamplingParams
from kvserve.kv.quant import QuantizedLatentCache
from kvserve.kv_plan import kv_bytes_per_token as plan_kv_bytes
from kvserve.models.attention import AttentionMetadata, PrefillSpan
from kvserve.models.deepseek import DeepseekForCausalLM
from kvserve.models.loader import load_weights

LOGIT_TOL = 1e-3
BLOCK = 16
KINDS = ["v2", "v2-group-yarn", "v3-yarn", "v3-nolora"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (folder, HF model), built once per module."""
    built = {}

    def get(kind: str):
        if kind not in built:
            folder = str(tmp_path_factory.mktemp(kind))
            built[kind] = folder, save_tiny_deepseek(folder, kind)
        return built[kind]

    return get


def our_model(path: str) -> DeepseekForCausalLM:
    config, weights = load_weights(path)
    model = DeepseekForCausalLM(config, config.max_position_embeddings)
    model.load_weights(weights)
    return model.eval()


def prefill(model, caches, token_ids: list[int], start: int = 0) -> torch.Tensor:
    """Runs tokens start..len-1 as one prefill span of a request whose blocks are 0, 1, 2, ...; returns logits."""
    n = len(token_ids)
    span = PrefillSpan(0, n - start, n)
    if start:
        span.block_ids = torch.arange(-(-n // BLOCK))
        span.mask = (torch.arange(n)[None, :] <= torch.arange(start, n)[:, None])[None, None]
    meta = AttentionMetadata(slot_mapping=torch.arange(start, n), num_decode_tokens=0, prefills=[span])
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(token_ids[start:]), torch.arange(start, n), caches, meta))


IDS = [5, 17, 200, 3, 99, 42, 7, 150, 11, 300, 8, 64, 128, 1, 77, 23, 310, 45, 6, 250]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(tiny, kind):
    folder, hf = tiny(kind)
    model = our_model(folder)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    caches = model.allocate_kv_cache(4, BLOCK, torch.float32)
    assert (prefill(model, caches, IDS) - ref).abs().max().item() < LOGIT_TOL
    # the same positions again as a continuation chunk over the cached first 7 tokens (expanded from latents)
    assert (prefill(model, caches, IDS, start=7) - ref[7:]).abs().max().item() < LOGIT_TOL


def test_fused_expert_names_load_too(tiny):
    """transformers holds routed experts fused ([E, 2I, hidden]); those names load like the checkpoint's."""
    folder, hf = tiny("v3-yarn")
    config, _ = load_weights(folder)
    model = DeepseekForCausalLM(config, config.max_position_embeddings)
    state = {**dict(hf.named_parameters()), **dict(hf.named_buffers())}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    model.load_weights(state.items())
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    assert (prefill(model, model.allocate_kv_cache(4, BLOCK, torch.float32), IDS) - ref).abs().max().item() < LOGIT_TOL

    _, weights = load_weights(folder)
    with pytest.raises(ValueError, match=r"missing weights: \['layers.2.mlp.experts.down_proj#5'\]"):
        model.load_weights((n, t) for n, t in weights if n != "model.layers.2.mlp.experts.5.down_proj.weight")


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_through_chunks_preemption_and_prefix_cache(tiny, kind):
    folder, hf = tiny(kind)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in (5, 17, 33, 40, 12, 28)]
    refs = [hf_greedy(hf, p, 24) for p in prompts]
    model_bytes = our_model(folder).kv_bytes_per_token(torch.float32)
    # 8 blocks hold ~2 of these requests (<= 64 tokens each); 16-token steps chunk every longer prompt
    llm = LLM(model=folder, kv_cache_memory=8 * BLOCK * model_bytes, max_num_batched_tokens=16, num_threads=1)
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    outs = llm.generate(prompts, params)
    stats = llm.get_stats()
    assert stats["num_preemptions"] > 0 and stats["num_chunked_prefills"] > 0
    for out, ref in zip(outs, refs):
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].text == ""  # no tokenizer files: token ids only
    llm.engine.check_idle()

    # a 40-token prompt twice: the second run reads its two full blocks from the prefix cache, and its
    # n=2 fork copies the partial third block (copy_blocks on latent blocks)
    greedy_n2 = SamplingParams(n=2, temperature=0, max_tokens=24, min_tokens=24)
    for _ in range(2):
        (out,) = llm.generate([prompts[3]], greedy_n2)
        assert [o.token_ids for o in out.outputs] == [refs[3], refs[3]]
    assert out.num_cached_tokens == 32
    llm.engine.check_idle()


def test_absorbed_decode_equals_expanded_attention(tiny):
    """Decode (latent space, W_UK/W_UV absorbed) against a one-token prefill span, which re-expands the same
    cached latents into per-head K/V: equal to fp32 round-off, for a batch of three contexts."""
    torch.manual_seed(0)
    folder, _ = tiny("v3-yarn")
    model = our_model(folder)
    attn = model.layers[1].self_attn
    num_blocks = 12
    cache = model.allocate_kv_cache(num_blocks, BLOCK, torch.float32)[0]
    cache.normal_()  # arbitrary cached latents
    lens = [5, 37, 16]  # context lengths including the new token: within a block, 3 blocks, exactly one block
    tables = [[0], [3, 7, 1], [9]]
    positions = torch.tensor([n - 1 for n in lens])
    x = torch.randn(3, model.config.hidden_size)
    cos, sin = model.rotary.tables(positions, torch.float32)
    slots = torch.tensor([t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lens)])

    width = max(len(t) for t in tables)
    decode = AttentionMetadata(
        slot_mapping=slots,
        num_decode_tokens=3,
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_mask=(torch.arange(width * BLOCK)[None, :] < torch.tensor(lens)[:, None])[:, None, None],
    )
    with torch.no_grad():
        absorbed = attn(x, cos, sin, cache, decode)
        for i, (table, n) in enumerate(zip(tables, lens)):
            span = PrefillSpan(0, 1, n, block_ids=torch.tensor(table), mask=torch.ones(1, 1, 1, n, dtype=torch.bool))
            meta = AttentionMetadata(slot_mapping=slots[i : i + 1], num_decode_tokens=0, prefills=[span])
            expanded = attn(x[i : i + 1], cos[i : i + 1], sin[i : i + 1], cache, meta)
            torch.testing.assert_close(absorbed[i : i + 1], expanded, rtol=1e-5, atol=1e-5)


def test_latent_cache_bytes_and_block_count(tiny):
    folder, hf = tiny("v2")
    cfg = hf.config
    layers, width = cfg.num_hidden_layers, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    model = our_model(folder)
    assert model.kv_bytes_per_token(torch.float32) == layers * width * 4 == model.config.kv_bytes_per_token(4)
    assert model.kv_bytes_per_token(torch.bfloat16) == layers * width * 2
    assert model.kv_bytes_per_token(torch.float32, "int8") == layers * (width + 4)  # one fp32 scale per token
    plan = plan_kv_bytes(model.config, "float32")  # kv-plan agrees, and prices the per-head expansion
    assert plan.total == layers * width * 4
    assert (
        plan.expanded_mha
        == layers * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    )

    budget = 1_000_000
    llm = LLM(model=folder, kv_cache_memory=budget, num_threads=1)
    num_blocks = budget // (layers * width * 4 * BLOCK)
    assert llm.engine.kv.pool.num_blocks == num_blocks
    caches = llm.engine.runner.kv_caches
    assert len(caches) == layers
    assert all(c.shape == (1, num_blocks, BLOCK, width) for c in caches)
    assert sum(c.numel() * c.element_size() for c in caches) == num_blocks * BLOCK * layers * width * 4 <= budget
    with pytest.raises(ValueError, match="kv_cache_dtype float16 is implemented for Llama-family models"):
        LLM(model=folder, kv_cache_memory=budget, kv_cache_dtype="float16", num_threads=1)


def test_int8_latent_cache(tiny):
    """An int8 latent cache (one fp32 scale per token and layer) round-trips the latents to ~0.5% and
    attention over it, absorbed decode and expanded prefill alike, stays within ~1% of fp32. (Logits
    are not compared: in a random MoE a 1% change can flip an expert choice and move them by units.)"""
    folder, _ = tiny("v3-yarn")
    model = our_model(folder)
    fp32 = model.allocate_kv_cache(4, BLOCK, torch.float32)
    int8 = model.allocate_kv_cache(4, BLOCK, torch.float32, "int8")
    assert isinstance(int8[0], QuantizedLatentCache) and int8[0].data.dtype == torch.int8
    assert int8[0].data.shape == (1, 4, BLOCK, 40) and int8[0].scales.shape == (1, 4, BLOCK)
    prefill(model, fp32, IDS[:12])  # a first chunk attends to its fresh latents: both caches get the same ones
    prefill(model, int8, IDS[:12])
    exact = fp32[1][0].flatten(0, 1)[:12]
    stored = (int8[1].data[0].float() * int8[1].scales[0].unsqueeze(-1)).flatten(0, 1)[:12]
    assert (stored - exact).abs().max() < 0.005 * exact.abs().max()

    attn = model.layers[1].self_attn
    torch.manual_seed(0)
    x = torch.randn(1, model.config.hidden_size)
    cos, sin = model.rotary.tables(torch.tensor([12]), torch.float32)
    decode = AttentionMetadata(
        slot_mapping=torch.tensor([12]),
        num_decode_tokens=1,
        decode_block_tables=torch.tensor([[0]]),
        decode_mask=(torch.arange(BLOCK) < 13)[None, None, None],
    )
    span = PrefillSpan(0, 1, 13, block_ids=torch.tensor([0]), mask=torch.ones(1, 1, 1, 13, dtype=torch.bool))
    chunk = AttentionMetadata(slot_mapping=torch.tensor([12]), num_decode_tokens=0, prefills=[span])
    with torch.no_grad():
        for meta in (decode, chunk):
            ref, got = attn(x, cos, sin, fp32[1], meta), attn(x, cos, sin, int8[1], meta)
            assert (got - ref).abs().max() < 0.02 * ref.abs().max()

    # through the engine: blocks sized by the int8 bytes, and n=2 forks copy data and scales of a latent block
    budget = 400_000
    llm = LLM(model=folder, kv_cache_memory=budget, kv_cache_dtype="int8", num_threads=1)
    assert llm.engine.kv.pool.num_blocks == budget // (BLOCK * model.config.num_layers * (40 + 4))
    (out,) = llm.generate([IDS[:17]], SamplingParams(n=2, temperature=0, max_tokens=8, min_tokens=8))
    assert len(out.outputs[0].token_ids) == 8 and out.outputs[0].token_ids == out.outputs[1].token_ids
    llm.engine.check_idle()
