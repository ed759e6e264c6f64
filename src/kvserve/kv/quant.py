"""Quantized KV caches: int8 (CPU and CUDA) and fp8 e4m3 (CUDA).

Attention layers (MHA/GQA), `QuantizedKVCache`. Keys and values have different error structures,
so they are quantized differently (KIVI, Liu et al. 2024):

- Keys: a few channels (RoPE pairs) carry most of the energy, and low-frequency pairs move slowly,
  so a channel varies far less within a block than the head varies within a token. A full block's
  keys are quantized per channel: one scale and one center for each (KV head, channel), covering
  the channel's [min, max] over the block's tokens. A block is quantized once, when its last token
  is written, and is read-only from then on (prefix caching shares it), so its parameters never
  change.
- Values: one symmetric scale per (token, KV head, group of 32 channels), written when the token
  enters the cache (a head dim that is no multiple of 32 has one group). Values are stored rotated
  by an orthogonal Hadamard matrix R (v' = v R), which spreads outlier channels over all of them
  (QuaRot); attention outputs are rotated back, sum_j p_j v_j = (sum_j p_j v'_j) R^T, so only
  [tokens, heads, D] x [D, D] per step, never the context.
- The recent window: every running sequence also keeps the K and V (rotated) of its last two blocks
  in 16 bits (`window`, see window_dtype), and attention reads those two blocks from there
  instead of their codes: the open block being filled (whose keys have no block scale yet) and the
  full block before it; when the context ends on a block boundary, only that last, full block.
  Recent tokens draw most of the attention, so this is where rounding costs
  the most (KIVI keeps such a residual too). The window is a ring of two block-sized entries per
  slot, entry = block index % 2. It holds only what the sequence wrote itself since it took its
  slot (a prefix-cache hit has only codes): see window_first_block. The blocks' codes are written
  all the same, so what prefix caching shares, preemption frees and the tiers move is unchanged.

On the default model the share of greedy continuations identical to full precision (64 tokens,
benchmarks/kv_quant_quality.py, 192 prompts): 91% (87% without the windows), 92% with the cache
rounded to bfloat16, ~66% with keys quantized per token like values.

Dequantization happens in attention, for the blocks attended only; the whole cache is never held in
full precision. On the CPU, compiled kernels (kvserve/kernels) read int8 codes where they lie: decode
attention folds the key scales into the query and the value scales into the softmax weights.

Bytes per block, layer and KV head: block_size x 2 x D codes + 2 x D x 4 (K scale and center) +
block_size x D / 32 x 4 (V scales): 168 per token for D = 64 and 16-token blocks, where fp32 takes
512 and bf16 256 (head dim 128: 304 vs bf16's 512). Plus the windows, max_num_seqs x 2 blocks of K and
V in window_dtype, which engine.py charges to the KV budget.

MLA's latent cache (`QuantizedLatentCache`) keeps one scale per token: its latent is both key and
value and is read through learned up-projections, not by RoPE'd channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# kv_cache_dtype -> (storage dtype, largest representable magnitude used for scaling)
QUANTIZED_KV_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "fp8": (torch.float8_e4m3fn, 448.0),
}
# kv_cache_dtype -> the dtype of a plain (unquantized) cache held in other than the model dtype: float16
# halves an fp32 model's KV bytes (llama.cpp's default cache type), read back to fp32 exactly.
PLAIN_KV_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16}
SCALE_DTYPE = torch.float32
WINDOW_BLOCKS = 2  # window entries per sequence: its open block and the full one before it
VALUE_GROUP = 32  # channels of a value per scale: two scales per 64-wide head read 86% vs 81% (192 prompts)
# Names the layout of quantized blocks in the prefix-cache hash chain (engine.py), so that blocks that
# the disk tier stored in an earlier layout are never read as this one.
QUANTIZED_FORMAT = "keys-per-channel-per-block/values-per-token-rotated"
_TINY = 1e-8  # scale floor: an all-equal channel or an all-zero head stays finite (and exact)


def hadamard(dim: int, device: torch.device | None = None) -> torch.Tensor:
    """An orthogonal [dim, dim] matrix with entries +-1/sqrt(n): Sylvester's Hadamard matrix when dim is
    a power of two, else block-diagonal with the largest power-of-two block dividing dim. Exact and the
    same on every machine (the disk tier shares quantized blocks across processes)."""
    block = dim & -dim  # largest power of two dividing dim
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / block**0.5
    return torch.block_diag(*[h] * (dim // block)).to(torch.float32).to(device)


@dataclass
class QuantizedKVCache:
    """One attention layer's quantized cache. The tensors of block_tensors() keep their blocks on dim 1
    (what copy_blocks and the offload tiers move); the window is per running sequence, not per block."""

    data: torch.Tensor  # [2, num_blocks, block_size, Hkv, D] storage dtype: K codes, V R codes
    key_params: torch.Tensor  # [2, num_blocks, Hkv, D] fp32: K scale, K center, per channel of a full block
    value_scales: torch.Tensor  # [1, num_blocks, block_size, Hkv, value_groups(D)] fp32
    # [2, num_open_slots, WINDOW_BLOCKS, block_size, Hkv, D] window_dtype: K and V R of each running
    # sequence's last two blocks, block index b in entry b % WINDOW_BLOCKS of its slot
    window: torch.Tensor
    rotation: torch.Tensor  # [D, D], R
    qmax: float

    @classmethod
    def allocate(
        cls,
        kv_cache_dtype: str,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        num_open_slots: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> QuantizedKVCache:
        if num_open_slots < 1:
            raise ValueError("a quantized KV cache needs open-block slots, one per running sequence")
        storage, qmax = QUANTIZED_KV_DTYPES[kv_cache_dtype]
        return cls(
            data=torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=storage, device=device),
            key_params=torch.zeros(2, num_blocks, num_kv_heads, head_dim, dtype=SCALE_DTYPE, device=device),
            value_scales=torch.zeros(
                1, num_blocks, block_size, num_kv_heads, value_groups(head_dim), dtype=SCALE_DTYPE, device=device
            ),
            window=torch.zeros(
                2,
                num_open_slots,
                WINDOW_BLOCKS,
                block_size,
                num_kv_heads,
                head_dim,
                dtype=window_dtype(dtype),
                device=device,
            ),
            rotation=hadamard(head_dim, device),
            qmax=qmax,
        )

    def block_tensors(self) -> list[torch.Tensor]:
        """What a full block is made of (the window only copies some)."""
        return [self.data, self.key_params, self.value_scales]


@dataclass
class QuantizedLatentCache:
    """One MLA layer's quantized latent cache: data [1, num_blocks, block_size, width], one fp32 scale
    per token, scales [1, num_blocks, block_size]."""

    data: torch.Tensor
    scales: torch.Tensor
    qmax: float

    def block_tensors(self) -> list[torch.Tensor]:
        return [self.data, self.scales]


def quantize(x: torch.Tensor, storage: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric, one scale per vector of the last dim: x [T, H, D] -> (q [T, H, D] in `storage`,
    scale [T, H] fp32)."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(_TINY) / qmax  # [T, H]
    return _codes(x / scale.unsqueeze(-1), storage, qmax), scale


def _codes(scaled: torch.Tensor, storage: torch.dtype, qmax: float) -> torch.Tensor:
    """Values already scaled into [-qmax, qmax], stored: int8 rounds (and clamps the float error at the
    edges); fp8 rounds in its own cast."""
    if storage == torch.int8:
        scaled = scaled.round_().clamp_(-qmax, qmax)
    return scaled.to(storage)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., H, D], scale [..., H] -> [..., H, D] in `dtype`."""
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


def value_groups(head_dim: int) -> int:
    """Scales per value vector: one per VALUE_GROUP channels, or one for a head dim that is no multiple."""
    return head_dim // VALUE_GROUP if head_dim % VALUE_GROUP == 0 else 1


def quantize_values(x: torch.Tensor, storage: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] -> (q [T, H, D] in `storage`, scale [T, H, value_groups(D)] fp32)."""
    q, scale = quantize(x.unflatten(-1, (value_groups(x.shape[-1]), -1)), storage, qmax)
    return q.flatten(-2), scale


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., H, D], scale [..., H, G] -> [..., H, D] in `dtype`."""
    return dequantize(q.unflatten(-1, (scale.shape[-1], -1)), scale, dtype).flatten(-2)


def quantize_key_blocks(
    keys: torch.Tensor, storage: torch.dtype, qmax: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full blocks of keys [C, block_size, H, D] -> (codes [C, block_size, H, D] in `storage`, scale and
    center [C, H, D] fp32): per (block, head, channel), center = (max + min) / 2 and scale =
    (max - min) / (2 qmax), so the codes span [-qmax, qmax] and k = code x scale + center."""
    keys = keys.float()
    high, low = keys.amax(dim=1), keys.amin(dim=1)  # [C, H, D]
    center = (high + low) / 2
    scale = ((high - low) / (2 * qmax)).clamp_min(_TINY)
    return _codes((keys - center.unsqueeze(1)) / scale.unsqueeze(1), storage, qmax), scale, center


def plain_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of a plain cache under kv_cache_dtype (auto: the model's), or None for a quantized one."""
    return model_dtype if kv_cache_dtype == "auto" else PLAIN_KV_DTYPES.get(kv_cache_dtype)


def kv_bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, model_dtype: torch.dtype, kv_cache_dtype: str
) -> int:
    """Bytes one block of K and V takes across all layers, scales included."""
    if (plain := plain_kv_dtype(kv_cache_dtype, model_dtype)) is not None:
        return num_layers * block_size * 2 * num_kv_heads * head_dim * torch.empty((), dtype=plain).element_size()
    element = torch.empty((), dtype=QUANTIZED_KV_DTYPES[kv_cache_dtype][0]).element_size()
    scale = torch.empty((), dtype=SCALE_DTYPE).element_size()
    codes = block_size * 2 * head_dim * element  # K and V
    params = 2 * head_dim * scale + block_size * value_groups(head_dim) * scale  # K per channel, V per token
    return num_layers * num_kv_heads * (codes + params)


def num_open_slots(max_num_seqs: int, budget_bytes: int, slot_bytes: int) -> int:
    """How many sequences get a window (an open slot): max_num_seqs, unless their slots would take over
    half the KV budget; then as many as fit in that half, at least one. The engine runs at most
    this many sequences; kv-plan reports the same."""
    return max(1, min(max_num_seqs, budget_bytes // 2 // slot_bytes))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """t, or for fp8 its bytes: a uint8 view of the same shape. What only moves codes (writes into
    slots, gathers, block copies) moves bytes, because PyTorch's index ops (index_copy_, index_select,
    indexing) have no fp8 kernels on the CPU."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def block_tensors(cache: torch.Tensor | QuantizedKVCache | QuantizedLatentCache) -> list[torch.Tensor]:
    """The tensors that hold a layer's full blocks, each with its blocks on dim 1 (what block copies and
    the offload tiers move): a plain cache is one."""
    return cache.block_tensors() if isinstance(cache, QuantizedKVCache | QuantizedLatentCache) else [cache]


def window_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """What the recent window holds K and V in: the model dtype, except fp16 for an fp32 model (half the
    bytes; a whole fp16 cache keeps 97% of greedy continuations on the default model, bf16 92%).
    Written values are clamped to fp16's range."""
    return torch.float16 if model_dtype == torch.float32 else model_dtype


def window_bytes_per_slot(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, model_dtype: torch.dtype
) -> int:
    """One running sequence's window (K and V of WINDOW_BLOCKS blocks in window_dtype), across all layers."""
    element = torch.empty((), dtype=window_dtype(model_dtype)).element_size()
    return num_layers * 2 * WINDOW_BLOCKS * block_size * num_kv_heads * head_dim * element


def window_first_block(context_len: int, first_written: int, block_size: int) -> int:
    """The first block of a context of `context_len` tokens that attention reads from the sequence's
    window: the full block before the open one (or the last block, when it is full), unless the
    sequence wrote no earlier than `first_written` into its slot (its blocks before came from the
    prefix cache or a lower tier, as codes only). May exceed the last block: then none."""
    return max(context_len // block_size - 1, -(-first_written // block_size))
