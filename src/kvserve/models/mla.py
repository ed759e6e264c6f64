"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

Per token, MLA projects the hidden state down to one latent c (kv_lora_rank wide, RMS-normed)
and one small rotary key k_pe (qk_rope_head_dim, shared by every head). Per-head keys and values
are up-projections of c through kv_b_proj:

    k[h] = [W_UK[h] c ; k_pe]      W_UK[h]: [nope_dim, kv_lora_rank]
    v[h] =  W_UV[h] c              W_UV[h]: [v_dim, kv_lora_rank]

The cache holds only [c ; k_pe] per token and layer (see `allocate_latent_cache` for the layout),
paged exactly like MHA blocks: same block ids, slot mapping, prefix hashing, preemption.

Prefill expands the context's latents into per-head K/V and runs ordinary causal attention.
Decode never expands: it absorbs W_UK into the query and W_UV into the output (see
`_decode_absorbed`), so each step reads kv_lora_rank + rope_dim numbers per cached token instead of
num_heads x (qk_head_dim + v_dim).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kvserve.distributed.group import ParallelGroup
from kvserve.kv.quant import (
    QUANTIZED_KV_DTYPES,
    SCALE_DTYPE,
    QuantizedLatentCache,
    as_bytes,
    dequantize,
    quantize,
)
from kvserve.models.attention import AttentionMetadata, KVCache
from kvserve.models.layers import RMSNorm, rope_inv_freq
from kvserve.models.model_config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_rope_parameters(
    rope_dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] and the factor cos/sin are multiplied by, computed in fp32
    exactly as transformers' default and YaRN rope (so positions round the same way)."""
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return 1.0 / (theta**exponents), 1.0
    if kind != "yarn":
        return rope_inv_freq(rope_dim, theta, scaling), 1.0
    old_context = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor") or max_position_embeddings / old_context
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over old_context
        return rope_dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta**exponents
    extrapolation = 1 - ramp  # 1: keep the trained frequency (fast dims), 0: interpolate by `factor` (slow dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def mla_softmax_scale(qk_head_dim: int, scaling: dict[str, Any] | None) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 when the config sets it."""
    scale = qk_head_dim**-0.5
    if scaling and scaling.get("mscale_all_dim"):
        mscale = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale *= mscale * mscale
    return scale


class MLARotary(nn.Module):
    """cos/sin tables [P, rope_dim/2] for the rotary part, the YaRN attention factor folded in (as HF does)."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        rope_dim = config.hf_config["qk_rope_head_dim"]
        inv_freq, attention_factor = mla_rope_parameters(
            rope_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, rope_dim/2]
        self.register_buffer("cos", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_factor, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cos/sin [T, 1, rope_dim/2], shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_mla_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, H, rope_dim]; cos/sin [T, 1, rope_dim/2]. DeepSeek checkpoints rotate interleaved pairs
    (x0, x1), (x2, x3), ...; the result is laid out de-interleaved ([rotated evens | rotated odds]),
    which changes no dot product as long as queries and keys use the same layout."""
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# The latent KV spec. Like MHA's [2 (K, V), num_blocks, block_size, Hkv, D], a layer's latent cache is
# [planes, num_blocks, block_size, width] with the blocks on dim 1, so code that moves whole blocks
# (copy_blocks for forked samples, tiers) addresses cache[:, block_ids] for either kind. MLA has one
# plane: the latent [c ; k_pe], which is both the key (all of it) and the value (its first
# kv_lora_rank columns). Quantized (int8/fp8), a token's latent gets one fp32 scale per layer.


def allocate_latent_cache(
    num_blocks: int, block_size: int, width: int, dtype: torch.dtype, kv_cache_dtype: str, device: torch.device
) -> KVCache:
    """[1, num_blocks, block_size, width] in the model dtype, or its quantized form (scales [1, num_blocks, block_size])."""
    if kv_cache_dtype == "auto":
        return torch.zeros(1, num_blocks, block_size, width, dtype=dtype, device=device)
    storage, qmax = QUANTIZED_KV_DTYPES[kv_cache_dtype]
    data = torch.zeros(1, num_blocks, block_size, width, dtype=storage, device=device)
    scales = torch.zeros(1, num_blocks, block_size, dtype=SCALE_DTYPE, device=device)
    return QuantizedLatentCache(data, scales, qmax)


def latent_bytes_per_token(num_layers: int, width: int, dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """layers x width x dtype bytes; quantized: layers x (width x 1 byte + one fp32 scale)."""
    if kv_cache_dtype == "auto":
        return num_layers * width * torch.empty((), dtype=dtype).element_size()
    storage = QUANTIZED_KV_DTYPES[kv_cache_dtype][0]
    element, scale = (torch.empty((), dtype=t).element_size() for t in (storage, SCALE_DTYPE))
    return num_layers * (width * element + scale)


def write_latents(kv_cache: KVCache, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent [T, width] goes to its T slots (block * block_size + offset), quantized first for an int8/fp8 cache."""
    width = latent.shape[1]
    if isinstance(kv_cache, QuantizedLatentCache):
        q, scale = quantize(latent.unsqueeze(1), kv_cache.data.dtype, kv_cache.qmax)  # [T, 1, width], [T, 1]
        as_bytes(kv_cache.data[0]).view(-1, width).index_copy_(0, slot_mapping, as_bytes(q[:, 0]))
        kv_cache.scales[0].view(-1).index_copy_(0, slot_mapping, scale[:, 0])
    else:
        kv_cache[0].view(-1, width).index_copy_(0, slot_mapping, latent)


def gather_latents(kv_cache: KVCache, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The latents of whole blocks in order: [len(block_ids) * block_size, width] in `dtype`. index_select
    of whole blocks is a row memcpy (~3x faster on the CPU than advanced indexing); a quantized cache is
    dequantized here, for the gathered blocks only."""
    if isinstance(kv_cache, QuantizedLatentCache):
        data = as_bytes(kv_cache.data[0]).index_select(0, block_ids).view(kv_cache.data.dtype)  # [n, bs, width]
        scales = kv_cache.scales[0].index_select(0, block_ids)  # [n, bs]
        return dequantize(data, scales, dtype).flatten(0, 1)
    return kv_cache[0].index_select(0, block_ids).flatten(0, 1)


class MLAAttention(nn.Module):
    """HF `self_attn` of DeepseekV2/V3 layers, with HF weight names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hf = config.hf_config
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.q_lora_rank: int | None = hf.get("q_lora_rank")
        self.kv_lora_rank: int = hf["kv_lora_rank"]
        self.nope_dim: int = hf["qk_nope_head_dim"]
        self.rope_dim: int = hf["qk_rope_head_dim"]
        self.v_dim: int = hf["v_head_dim"]
        self.qk_dim = self.nope_dim + self.rope_dim
        # V2 always rotates interleaved pairs; V3 does unless its config says rope_interleave: false.
        self.interleaved = config.architecture == "DeepseekV2ForCausalLM" or bool(hf.get("rope_interleave", True))
        self.scale = mla_softmax_scale(self.qk_dim, config.rope_scaling)
        bias = bool(hf.get("attention_bias", False))
        H = self.num_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)  # HF uses the default eps here, not rms_norm_eps
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, hidden, bias=bias)
        self.tp: ParallelGroup | None = None  # tensor parallelism: this rank's heads; o_proj's sums are partial

    @property
    def latent_width(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope_dim, kv_lora_rank] and W_UV [H, v_dim, kv_lora_rank]: views of kv_b_proj.weight,
        whose rows are per head [nope_dim key rows | v_dim value rows]. Views cost nothing to take, and
        taken per call they stay right after to_empty, load_weights and device moves."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> q_nope [T, H, nope_dim], q_pe [T, H, rope_dim] (roped), latent [T, kv_lora_rank + rope_dim]."""
        T = x.shape[0]
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(T, self.num_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_pe = apply_mla_rotary(q_pe, cos, sin, self.interleaved)
        k_pe = apply_mla_rotary(k_pe.view(T, 1, self.rope_dim), cos, sin, self.interleaved).view(T, self.rope_dim)
        return q_nope, q_pe, torch.cat((self.kv_a_layernorm(c), k_pe), dim=-1)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,  # [1, num_blocks, block_size, kv_lora_rank + rope_dim], see allocate_latent_cache
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        q_nope, q_pe, latent = self.project(x, cos, sin)
        write_latents(kv_cache, latent, meta.slot_mapping)
        out = torch.empty(x.shape[0], self.num_heads, self.v_dim, dtype=x.dtype, device=x.device)
        nd = meta.num_decode_tokens
        if nd:
            out[:nd] = self._decode_absorbed(q_nope[:nd], q_pe[:nd], kv_cache, meta)
        for span in meta.prefills:
            rows = slice(span.start, span.start + span.num_tokens)
            if span.block_ids is None:  # no earlier context: this chunk's own latents
                context = latent[rows]
            else:
                context = gather_latents(kv_cache, span.block_ids, x.dtype)[: span.context_len]
            out[rows] = self._prefill_expanded(q_nope[rows], q_pe[rows], context, span.mask)
        out = self.o_proj(out.view(x.shape[0], self.num_heads * self.v_dim))
        return out if self.tp is None else self.tp.all_reduce(out)

    def _prefill_expanded(
        self,
        q_nope: torch.Tensor,  # [Tq, H, nope_dim]
        q_pe: torch.Tensor,  # [Tq, H, rope_dim]
        context: torch.Tensor,  # [S, kv_lora_rank + rope_dim], S = Tq (causal) or the span's context_len
        mask: torch.Tensor | None,  # [1, 1, Tq, S] or None for plain causal
    ) -> torch.Tensor:  # [Tq, H, v_dim]
        S, H = context.shape[0], self.num_heads
        c, k_pe = context.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c).view(S, H, self.nope_dim + self.v_dim).split([self.nope_dim, self.v_dim], -1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(S, H, self.rope_dim)), dim=-1)  # [S, H, qk_dim]
        q = torch.cat((q_nope, q_pe), dim=-1)  # [Tq, H, qk_dim]
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, Tq, qk_dim]
            k.transpose(0, 1).unsqueeze(0),  # [1, H, S, qk_dim]
            v.transpose(0, 1).unsqueeze(0),  # [1, H, S, v_dim]
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
        )
        return attn[0].transpose(0, 1)

    def _decode_absorbed(
        self,
        q_nope: torch.Tensor,  # [Nd, H, nope_dim]
        q_pe: torch.Tensor,  # [Nd, H, rope_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [Nd, H, v_dim]
        """Attention in the latent space. For head h, query q = [q_nope ; q_pe] and cached token t = [c_t ; k_pe_t]:

            score(h, t) = q_nope . (W_UK[h] c_t) + q_pe . k_pe_t
                        = (q_nope W_UK[h]) . c_t  + q_pe . k_pe_t  =  [q_lat ; q_pe] . [c_t ; k_pe_t]
            out[h]      = sum_t p(h, t) W_UV[h] c_t  =  W_UV[h] (sum_t p(h, t) c_t)

        q_lat = q_nope W_UK[h]: [nope_dim] x [nope_dim, kv_lora_rank] -> [kv_lora_rank]. So decode is
        one-KV-head attention whose keys are the cached rows themselves (kv_lora_rank + rope_dim wide)
        and whose values are their first kv_lora_rank columns; W_UV maps the attended latent back to
        v_dim per head. All H heads share that one key/value head, so they are folded into the query
        axis ([Nd, 1, H, width]) and the gathered blocks are read once per request, never expanded."""
        nd, H = q_nope.shape[:2]
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [H, Nd, nope] @ [H, nope, r] -> [Nd, H, r]
        query = torch.cat((q_lat, q_pe), dim=-1).unsqueeze(1)  # [Nd, 1, H, r + rope_dim]
        latents = gather_latents(kv_cache, meta.decode_block_tables.flatten(), q_nope.dtype)  # [Nd * L, r + rope_dim]
        keys = latents.view(nd, 1, -1, self.latent_width)  # [Nd, 1, L, r + rope_dim], L = max_blocks * block_size
        values = keys[..., : self.kv_lora_rank]  # [Nd, 1, L, r]: the latents c themselves
        attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=meta.decode_mask, scale=self.scale)
        out_lat = attn.view(nd, H, self.kv_lora_rank).transpose(0, 1)  # [H, Nd, r]
        return torch.bmm(out_lat, w_uv.transpose(1, 2)).transpose(0, 1)  # [H, Nd, r] @ [H, r, v] -> [Nd, H, v]
