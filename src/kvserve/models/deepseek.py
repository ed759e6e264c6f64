"""DeepSeek-V2 / V3 decoder (HF `DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`) with a latent KV cache.

x = embed(ids)
for each layer:
    h = x + o_proj(MLA(norm(x)))                     multi-head latent attention, mla.py
    x = h + mlp(norm(h))                             dense SwiGLU for the first first_k_dense_replace
                                                     layers, then routed + shared experts (moe.py)
logits = lm_head(norm(x))

The KV cache per layer is one [1, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] tensor of
normed latents and roped shared keys (mla.py, allocate_latent_cache): layers x (kv_lora_rank +
qk_rope_head_dim) x dtype bytes per token, against layers x heads x (qk_head_dim + v_head_dim) for
the same attention with per-head K and V. Blocks are addressed by the same block ids and slot mapping
as MHA blocks, so the block pool, prefix cache, preemption and int8/fp8 KV need nothing MLA-specific.

V2 and V3 differ only in the router (moe.py) and in V3's optional non-interleaved rope (mla.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from kvserve.distributed.group import ParallelGroup
from kvserve.models.attention import AttentionMetadata, KVCache
from kvserve.models.layers import Embedding, RMSNorm, SwiGLU
from kvserve.models.mla import MLAAttention, MLARotary, allocate_latent_cache, latent_bytes_per_token
from kvserve.models.model_config import ModelConfig
from kvserve.models.moe import DeepseekMoE, is_moe_layer

# checkpoint name -> (fused parameter, part): gate/up of dense MLPs and shared experts share one matrix
_FUSED_MLP = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
# layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight, as published checkpoints name routed experts
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module
        if is_moe_layer(config, layer_idx):
            self.mlp = DeepseekMoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, kv_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        hf = config.hf_config
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
            raise ValueError("kvserve's DeepSeek supports hidden_act silu without MLP biases")
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = MLARotary(config, max_positions)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.tp: ParallelGroup | None = None  # tensor parallelism: set_tensor_parallel

    @property
    def latent_width(self) -> int:
        return self.config.hf_config["kv_lora_rank"] + self.config.hf_config["qk_rope_head_dim"]

    def init_non_persistent(self, device: torch.device) -> None:
        """After `to_empty`: rebuild the rope tables and re-tie the LM head."""
        with torch.device(device):
            self.rotary = MLARotary(self.config, self.rotary.cos.shape[0])
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def allocate_kv_cache(
        self,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
        num_open_slots: int = 0,
    ) -> list[KVCache]:
        """Per layer: one [1, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] latent tensor, or its
        int8/fp8 form with one scale per token."""
        device = self.embed_tokens.weight.device
        return [
            allocate_latent_cache(num_blocks, block_size, self.latent_width, dtype, kv_cache_dtype, device)
            for _ in self.layers
        ]

    def kv_bytes_per_token(self, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        return latent_bytes_per_token(self.config.num_layers, self.latent_width, dtype, kv_cache_dtype)

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        return block_size * self.kv_bytes_per_token(dtype, kv_cache_dtype)

    def window_bytes_per_slot(self, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        return 0  # the latent cache quantizes per token: no recent window

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], final-normed
        x = self.embed_tokens(input_ids, self.norm.weight.dtype)
        cos, sin = self.rotary.tables(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[S, hidden] -> [S, V] float32; with tensor parallelism the whole V on rank 0, None elsewhere."""
        logits = self.lm_head(hidden).float()
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    def set_tensor_parallel(self, tp: ParallelGroup, first_vocab_id: int) -> None:
        """This model is rank tp.rank's shard (distributed/sharding.py): each rank runs its heads of MLA
        (the latent cache, one "head" for all, is replicated) and its rows of every MLP and expert; the
        attention's and the MLP's partial outputs are summed across the group (an MoE layer's routed
        and shared experts in one all-reduce); the embedding is vocabulary-parallel."""
        self.tp = tp
        self.embed_tokens.first_id = first_vocab_id
        self.embed_tokens.reduce = tp
        for layer in self.layers:
            layer.self_attn.tp = tp
            if isinstance(layer.mlp, SwiGLU):
                layer.mlp.down_proj.reduce = tp
            else:
                layer.mlp.tp = tp

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Takes HF-named tensors: routed experts per expert (`experts.{e}.gate_proj.weight`, as checkpoints
        store them) or fused (`experts.gate_up_proj`, as transformers holds them); gate/up of dense MLPs and
        shared experts fused into gate_up_proj. V3's multi-token-prediction layers (index >= num_layers)
        are skipped, as transformers skips them."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            if name.startswith("layers.") and int(name.split(".")[1]) >= self.config.num_layers:
                continue
            if name.endswith("weight_scale_inv"):
                raise ValueError(f"{name}: FP8 block-quantized checkpoints are not supported; use a bf16 conversion")
            target, index, key = self._destination(name, params)
            dest = params[target].data[index]
            if dest.shape != tensor.shape:
                raise ValueError(f"weight {name}: expected shape {tuple(dest.shape)}, got {tuple(tensor.shape)}")
            dest.copy_(tensor)
            loaded.add(key)
        self._check_all_loaded(params, loaded)

    def _destination(self, name: str, params: dict[str, nn.Parameter]) -> tuple[str, tuple, str]:
        """(parameter, index into it, key recorded as loaded) for one checkpoint tensor."""
        parts = name.split(".")
        expert = _EXPERT.match(name)
        if expert:  # one routed expert's matrix -> its slice of the fused [E, ...] parameter
            prefix, index, proj = expert.group(1), int(expert.group(2)), expert.group(3)
            if proj == "down_proj":
                target, dest, key = f"{prefix}.down_proj", (index,), f"{prefix}.down_proj#{index}"
            else:
                target, part = f"{prefix}.gate_up_proj", 0 if proj == "gate_proj" else 1
                inter = params[target].shape[1] // 2 if target in params else 0
                dest, key = (index, slice(part * inter, (part + 1) * inter)), f"{target}#{index}.{part}"
        elif len(parts) >= 2 and parts[-2] in _FUSED_MLP:  # dense MLP / shared experts: half of gate_up_proj
            fused, part = _FUSED_MLP[parts[-2]]
            target = ".".join(parts[:-2] + [fused, parts[-1]])
            size = params[target].shape[0] // 2 if target in params else 0
            dest, key = (slice(part * size, (part + 1) * size),), f"{target}#{part}"
        else:
            target, dest, key = name, (), name
        if target not in params:
            raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
        return target, dest, key

    def _check_all_loaded(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        missing = []
        for name in params:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                if name in loaded:  # fused checkpoint tensor
                    continue
                num_experts = params[name].shape[0]
                suffixes = (
                    [f"{e}.{p}" for e in range(num_experts) for p in (0, 1)]
                    if "gate_up" in name
                    else range(num_experts)
                )
                parts = [f"{name}#{s}" for s in suffixes]
            elif name.endswith("gate_up_proj.weight"):
                parts = [f"{name}#0", f"{name}#1"]
            else:
                parts = [name]
            missing += [p for p in parts if p not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
