"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 (q/k/v biases), SmolLM.

x = embed(ids)
for each layer:
    h = x + o_proj(attention(rope(q), rope(k), v))     with RMSNorm before attention
    x = h + down(silu(gate(h)) * up(h))                 with RMSNorm before the MLP
logits = lm_head(norm(x))                               lm_head may be tied to embed

Grouped-query attention: Hq query heads share Hkv key/value heads (G = Hq / Hkv).
Q, K and V are one fused matrix product, gate and up another. The model sees one
flat batch of T tokens (no padding) and the KV cache through AttentionMetadata.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvserve.kv.quant import QuantizedKVCache, kv_bytes_per_block, window_bytes_per_slot
from kvserve.models.attention import AttentionMetadata, KVCache, paged_attention, write_kv
from kvserve.models.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from kvserve.models.model_config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)  # [T, Hq, D]
        k = apply_rotary(k.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)  # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        write_kv(kv_cache, k, v, meta)
        return self.o_proj(paged_attention(q, k, v, kv_cache, meta, self.scale))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, kv_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_non_persistent(self, device: torch.device) -> None:
        """After `to_empty`: rebuild computed buffers and re-tie the LM head."""
        config = self.config
        with torch.device(device):
            self.rotary = RotaryEmbedding(
                config.head_dim, self.rotary.cos.shape[0], config.rope_theta, config.rope_scaling
            )
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def allocate_kv_cache(
        self,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
        num_open_slots: int = 0,
    ) -> list[KVCache]:
        """Per layer: one [2, num_blocks, block_size, Hkv, D] tensor (K and V), or its quantized form with
        `num_open_slots` recent windows (kv/quant.py)."""
        heads, head_dim = self.config.num_kv_heads, self.config.head_dim
        device = self.embed_tokens.weight.device
        if kv_cache_dtype != "auto":
            return [
                QuantizedKVCache.allocate(
                    kv_cache_dtype, num_blocks, block_size, heads, head_dim, num_open_slots, dtype, device
                )
                for _ in self.layers
            ]
        shape = (2, num_blocks, block_size, heads, head_dim)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        c = self.config
        return kv_bytes_per_block(c.num_layers, c.num_kv_heads, c.head_dim, block_size, dtype, kv_cache_dtype)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Full-precision KV bytes of one token across all layers."""
        return self.kv_bytes_per_block(1, dtype)

    def window_bytes_per_slot(self, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        """What one running sequence's recent window costs (quantized caches only, kv/quant.py)."""
        if kv_cache_dtype == "auto":
            return 0
        c = self.config
        return window_bytes_per_slot(c.num_layers, c.num_kv_heads, c.head_dim, block_size, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], final-normed
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.tables(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes HF-named tensors; fuses q/k/v and gate/up into this model's fused matrices."""
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, index = fused[parts[-2]]
                target_name = ".".join(parts[:-2] + [target, parts[-1]])
                param = params[target_name]
                offset, size = self._fused_slice(target, index)
                param.data[offset : offset + size].copy_(tensor)
                loaded.add(f"{target_name}#{index}")
                continue
            if name not in params:
                raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"weight {name}: expected shape {tuple(params[name].shape)}, got {tuple(tensor.shape)}"
                )
            params[name].data.copy_(tensor)
            loaded.add(name)
        self._check_all_loaded(params, loaded)

    def _fused_slice(self, target: str, index: int) -> tuple[int, int]:
        attn = self.layers[0].self_attn
        if target == "qkv_proj":
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        else:
            sizes = [self.config.intermediate_size] * 2
        return sum(sizes[:index]), sizes[index]

    def _check_all_loaded(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        missing = []
        for name in params:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                parts = [f"{name}#{i}" for i in range(3)]
            elif name.endswith("gate_up_proj.weight"):
                parts = [f"{name}#{i}" for i in range(2)]
            else:
                parts = [name]
            missing += [p for p in parts if p not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
