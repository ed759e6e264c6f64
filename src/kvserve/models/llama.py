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
from types import ModuleType

import torch
from torch import nn

from kvserve.distributed.group import ParallelGroup
from kvserve.kv.quant import QuantizedKVCache, kv_bytes_per_block, plain_kv_dtype, window_bytes_per_slot
from kvserve.models.attention import KERNEL_KV_DTYPES, AttentionMetadata, KVCache, paged_attention, write_kv
from kvserve.models.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary, kernel_for
from kvserve.models.model_config import ModelConfig
from kvserve.models.quantized import QuantizedWeight, quantize_int8


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, D/2]
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        ops = kernel_for(self.qkv_proj, qkv)
        fused = ops is not None and qkv.is_contiguous()
        plain = isinstance(kv_cache, torch.Tensor) and kv_cache.dtype in KERNEL_KV_DTYPES
        if fused:  # one pass: q and k rotated in place, k and v into a plain cache (a quantized one below)
            cache, slots = (kv_cache, meta.slot_mapping) if plain else (None, None)
            ops.rope_kv_write(qkv, self.num_heads, self.num_kv_heads, cos[:, 0], sin[:, 0], cache, slots)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not fused:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if not (fused and plain):
            write_kv(kv_cache, k, v, meta)
        return self.o_proj(paged_attention(q, k, v, kv_cache, meta, self.scale))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, h, residual, cos, sin, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous layer's MLP output, not yet added to the residual stream (None before the
        first layer). Returns this layer's MLP output and the stream, each add fused into a norm."""
        x, residual = self.input_layernorm.add_forward(h, residual)
        h = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # Decode-only steps over plain fp32/fp16 caches run every layer in one compiled call (kernels/decoder.cpp),
    # bitwise equal to the layers below; False runs the layers from Python (to profile them one by one).
    use_decode_stack = True

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._decode_stack: tuple[ModuleType, object] | None = None  # (the kernels it was built with, the stack)
        self.tp: ParallelGroup | None = None  # tensor parallelism: set_tensor_parallel

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
        device = self.norm.weight.device
        plain = plain_kv_dtype(kv_cache_dtype, dtype)
        if plain is None:
            return [
                QuantizedKVCache.allocate(
                    kv_cache_dtype, num_blocks, block_size, heads, head_dim, num_open_slots, dtype, device
                )
                for _ in self.layers
            ]
        shape = (2, num_blocks, block_size, heads, head_dim)
        return [torch.zeros(shape, dtype=plain, device=device) for _ in self.layers]

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        c = self.config
        return kv_bytes_per_block(c.num_layers, c.num_kv_heads, c.head_dim, block_size, dtype, kv_cache_dtype)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Full-precision KV bytes of one token across all layers."""
        return self.kv_bytes_per_block(1, dtype)

    def window_bytes_per_slot(self, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        """What one running sequence's recent window costs (quantized caches only, kv/quant.py)."""
        if plain_kv_dtype(kv_cache_dtype, dtype) is not None:
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
        residual = self.embed_tokens(input_ids, self.norm.weight.dtype)  # [T, hidden]: the residual stream
        cos, sin = self.rotary.tables(positions, residual.dtype)
        if (stack := self.decode_stack(residual, kv_caches, meta)) is not None:
            lens = meta.decode_rows()[0]
            h, residual = stack.decode(
                residual, cos[:, 0], sin[:, 0], kv_caches, meta.slot_mapping, meta.decode_block_tables, lens
            )
            return self.norm.add_forward(h, residual)[0]
        h = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, cos, sin, kv_cache, meta)
        return self.norm.add_forward(h, residual)[0]

    def decode_stack(self, residual: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata):
        """The compiled stack of every layer (kernels/decoder.cpp) when this step can take it: decodes
        only, no cascade, fp32 on the CPU with the kernels, plain fp32 or fp16 caches; else None."""
        ops = kernel_for(self.norm, residual)
        if not self.use_decode_stack or ops is None or meta.compute_ops is None:
            return None
        if meta.prefills or meta.decode_cascade is not None or not meta.num_decode_tokens:
            return None
        first = kv_caches[0]
        if not isinstance(first, torch.Tensor) or first.dtype not in KERNEL_KV_DTYPES:
            return None
        if self._decode_stack is None or self._decode_stack[0] is not ops:  # built once per set of kernels
            layers = []
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                layers.append(
                    ops.LlamaLayer(
                        layer.input_layernorm.weight,
                        layer.post_attention_layernorm.weight,
                        layer.input_layernorm.eps,  # both norms of a layer share the config's eps
                        attn.qkv_proj.projection(ops),
                        attn.o_proj.projection(ops),
                        mlp.gate_up_proj.projection(ops),
                        mlp.down_proj.projection(ops),
                        attn.num_heads,
                        attn.num_kv_heads,
                        attn.head_dim,
                        attn.scale,
                    )
                )
            self._decode_stack = (ops, ops.DecoderStack(layers))
        return self._decode_stack[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[S, hidden] -> [S, V] float32; with tensor parallelism the whole V on rank 0, None elsewhere."""
        logits = self.lm_head(hidden).float()
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    def set_tensor_parallel(self, tp: ParallelGroup, first_vocab_id: int) -> None:
        """This model is rank tp.rank's shard (distributed/sharding.py): o_proj and down_proj sum their
        partial products across the group, the embedding is vocabulary-parallel, the LM head's
        logits are gathered on rank 0. The compiled decode stack runs no collectives: it is off."""
        self.tp = tp
        self.use_decode_stack = False
        self.embed_tokens.first_id = first_vocab_id
        self.embed_tokens.reduce = tp
        for layer in self.layers:
            layer.self_attn.o_proj.reduce = tp
            layer.mlp.down_proj.reduce = tp

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]], quantization: str = "auto"
    ) -> None:
        """Takes HF-named tensors; fuses q/k/v and gate/up into this model's fused matrices.

        A QuantizedWeight (a GGUF file's blocks) stays quantized (models/quantized.py), except with
        quantization "none", which expands it; "int8" quantizes every float linear weight (and the
        embedding) as it arrives, so the float model is never held whole."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        fused = {
            "q_proj": ("qkv_proj", 0, 3),
            "k_proj": ("qkv_proj", 1, 3),
            "v_proj": ("qkv_proj", 2, 3),
            "gate_proj": ("gate_up_proj", 0, 2),
            "up_proj": ("gate_up_proj", 1, 2),
        }
        pending: dict[str, dict[int, torch.Tensor | QuantizedWeight]] = {}  # fused parts until all have come
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            tensor = self._as_stored(name, tensor, quantization)
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, index, count = fused[parts[-2]]
                target_name = ".".join(parts[:-2] + [target, parts[-1]])
                group = pending.setdefault(target_name, {})
                group[index] = tensor
                if len(group) == count:
                    self._load_fused(target_name, [group[i] for i in range(count)], params, modules)
                    loaded.update(f"{target_name}#{i}" for i in range(count))
                    del pending[target_name]
                continue
            if isinstance(tensor, QuantizedWeight):
                self._set_quantized(name.removesuffix(".weight"), tensor, modules)
                loaded.add(name)
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

    def _as_stored(self, name: str, tensor: torch.Tensor | QuantizedWeight, quantization: str):
        """The weight in the form this model keeps it under `quantization`."""
        if isinstance(tensor, QuantizedWeight):
            return tensor.dequantize(self.norm.weight.dtype) if quantization == "none" else tensor
        is_matrix = name.endswith(".weight") and tensor.dim() == 2  # linear layers and the embedding
        if quantization == "int8" and is_matrix and tensor.shape[1] % 32 == 0:
            return quantize_int8(tensor)
        return tensor

    def _set_quantized(self, module_name: str, weight: QuantizedWeight, modules: dict[str, nn.Module]) -> None:
        module = modules.get(module_name)
        if not isinstance(module, (Linear, Embedding)):
            raise ValueError(f"unexpected quantized weight {module_name}.weight for {self.config.architecture}")
        weight = weight.to(self.norm.weight.device)
        module.set_quantized(weight)
        if module is self.embed_tokens and self.config.tie_word_embeddings:
            self.lm_head.set_quantized(weight)  # the tied head reads the same blocks

    def _load_fused(self, target_name: str, parts: list, params: dict, modules: dict[str, nn.Module]) -> None:
        """All parts quantized: one quantized matrix; otherwise the dense parameter, slice by slice."""
        if all(isinstance(p, QuantizedWeight) for p in parts):
            self._set_quantized(target_name.removesuffix(".weight"), QuantizedWeight.concat(parts), modules)
            return
        param = params[target_name]
        target = target_name.split(".")[-2]
        for index, part in enumerate(parts):
            if isinstance(part, QuantizedWeight):
                part = part.dequantize(param.dtype)
            offset, size = self._fused_slice(target, index)
            if part.shape[0] != size:
                raise ValueError(f"weight {target_name} part {index}: expected {size} rows, got {part.shape[0]}")
            param.data[offset : offset + size].copy_(part)

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
            if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
                parts = [f"{name}#{i}" for i in range(3)]
            elif name.endswith("gate_up_proj.weight"):
                parts = [f"{name}#{i}" for i in range(2)]
            else:
                parts = [name]
            missing += [p for p in parts if p not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
