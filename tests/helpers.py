"""Shared test helpers: tiny random HF models saved locally, GGUF writing, greedy comparison."""

from __future__ import annotations

import os

import numpy as np
import torch

NEAR_TIE = 0.02  # logprob gap under which a greedy divergence counts as a genuine near-tie
# One 16-token KV block of save_tiny_model's default llama in fp32: layers x (K, V) x block x KV heads x
# head dim x 4 bytes
TINY_LLAMA_BLOCK_BYTES = 3 * 2 * 16 * 2 * 16 * 4


def save_tiny_model(folder: str, kind: str, seed: int = 0, shard: bool = False, **overrides) -> torch.nn.Module:
    """Builds a tiny random-weight transformers model ("llama" untied, "qwen2" with biases, "mistral")
    and saves it as safetensors (sharded with an index when `shard`). `overrides` replace config
    fields (num_key_value_heads=1, vocab_size=...). Returns the HF model."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    if kind == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
        model = LlamaForCausalLM(config)
    elif kind == "llama3":
        scaling = dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
        config = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=scaling)
        model = LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0)
        model = Qwen2ForCausalLM(config)
    elif kind == "mistral":
        config = MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
        model = MistralForCausalLM(config)
    else:
        raise ValueError(kind)
    widen_random_init(model)
    model.eval()
    model.save_pretrained(folder, max_shard_size="200KB" if shard else "2GB")
    return model


_YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=128,
    mscale=1.0,
    mscale_all_dim=1.0,
    beta_fast=32,
    beta_slow=1,
)


def save_tiny_deepseek(folder: str, kind: str, seed: int = 0) -> torch.nn.Module:
    """Tiny DeepSeek-V2/V3 variants covering q LoRA on and off, greedy / group-limited / noaux_tc routing,
    default and YaRN rope, interleaved and plain rope, attention biases, all-MoE and dense-first stacks."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "v2":
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**common, q_lora_rank=None, topk_method="greedy"))
    elif kind == "v2-group-yarn":
        config = DeepseekV2Config(
            **{**common, "num_hidden_layers": 4, "first_k_dense_replace": 0},
            q_lora_rank=48,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            rope_parameters=_YARN,
        )
        model = DeepseekV2ForCausalLM(config)
    elif kind == "v3-yarn":
        model = DeepseekV3ForCausalLM(
            DeepseekV3Config(**common, q_lora_rank=48, n_group=2, topk_group=1, rope_parameters=_YARN)
        )
    elif kind == "v3-nolora":
        config = DeepseekV3Config(
            **common,
            q_lora_rank=None,
            n_group=2,
            topk_group=1,
            rope_interleave=False,
            attention_bias=True,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        )
        model = DeepseekV3ForCausalLM(config)
    else:
        raise ValueError(kind)
    widen_random_init(model)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)  # non-zero, so choosing on biased scores is exercised
    model.eval()
    model.save_pretrained(folder)
    return model


def widen_random_init(model: torch.nn.Module) -> None:
    """HF's init is small; widen it so a tiny random model's logits are not all near-ties."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith("bias"):
                p.normal_(0, 0.2)
            else:  # norm weights
                p.normal_(1.0, 0.1)


def write_gguf(path: str, hf_model: torch.nn.Module, arch: str, quant: str | None = None) -> None:
    """Writes a tiny HF llama/qwen2 model as a GGUF file the way llama.cpp's converter does,
    including its permutation of Q/K rows for llama (which the loader must undo). F32 and F16 tensors,
    or with `quant` (a GGML type name, e.g. "Q4_1") every matrix quantized by gguf-py."""
    import gguf

    cfg = hf_model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = (
        cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") and cfg.rope_parameters else cfg.rope_theta
    )
    writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    state = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{per_layer[rest]}"
        else:
            gguf_name = names[name]
        array = tensor.detach().float().numpy()
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            array = permute(array, cfg.num_attention_heads)
        elif arch == "llama" and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            array = permute(array, cfg.num_key_value_heads)
        if array.ndim == 2 and quant is not None:
            kind = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(gguf_name, gguf.quants.quantize(np.ascontiguousarray(array), kind), raw_dtype=kind)
            continue
        if array.ndim == 2 and "token_embd" not in gguf_name:
            array = array.astype(np.float16)  # exercise the F16 path too
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """transformers' own greedy continuation, EOS masked (min_new_tokens) so exactly num_tokens come back."""
    return hf_greedy_with_logprobs(model, prompt_ids, num_tokens)[0]


def hf_greedy_with_logprobs(model, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], list[dict[int, float]]]:
    """hf_greedy's tokens, and at each step the reference's two most likely tokens' logprobs (what
    assert_same_or_near_tie reads)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=num_tokens,
            min_new_tokens=num_tokens,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    top2 = []
    for scores in out.scores:
        values, ids = torch.log_softmax(scores[0].double(), -1).topk(2)
        top2.append(dict(zip(ids.tolist(), values.tolist())))
    return out.sequences[0, len(prompt_ids) :].tolist(), top2


def assert_same_or_near_tie(
    got: list[int], ref: list[int], ref_logprobs: list[dict[int, float]] | None = None, near_tie: float = NEAR_TIE
):
    """Token-for-token equality, except a divergence where the reference's top two candidates were a
    genuine near-tie (gap under near_tie), after which the continuations may legitimately differ."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            assert ref_logprobs is not None, f"diverged at {i}: {got} vs {ref}"
            top = sorted(ref_logprobs[i].values(), reverse=True)
            assert len(top) >= 2 and top[0] - top[1] < near_tie, f"diverged at {i} without a near-tie: {top[:3]}"
            return
    assert len(got) == len(ref)


def default_gguf() -> str:
    from kvserve.models.paths import default_model_path

    return default_model_path()


def gguf_folder_and_file() -> tuple[str, str]:
    return os.path.split(default_gguf())


# A tool whose parameters use "#/$defs/..." references, as pydantic-generated schemas do (tool calling tests).
POINT_SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
PLOT_PARAMETERS = {
    "type": "object",
    "properties": {"p": {"$ref": "#/$defs/Point"}},
    "required": ["p"],
    "$defs": {"Point": POINT_SCHEMA},
}
PLOT_TOOL = {"type": "function", "function": {"name": "plot", "parameters": PLOT_PARAMETERS}}


def random_prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of `length` token ids in the tiny models' vocabulary (3..319), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (length,), generator=g).tolist() for _ in range(count)]


def tiered_llm(model: str, folder, device_blocks: int, host_blocks: int | None, disk_blocks: int = 400, **kw):
    """An LLM on a tiny llama whose KV pool, host tier and disk tier hold the given numbers of blocks."""
    from kvserve import LLM

    return LLM(
        model,
        kv_cache_memory=device_blocks * TINY_LLAMA_BLOCK_BYTES,
        kv_offload_memory=host_blocks * TINY_LLAMA_BLOCK_BYTES if host_blocks else None,
        kv_offload_dir=str(folder),
        kv_offload_disk=disk_blocks * (TINY_LLAMA_BLOCK_BYTES + 4096),
        max_model_len=128,
        max_num_batched_tokens=512,  # the counts the tests expect: 5 of 6 prompts prefilled in the first step
        **kw,
    )
