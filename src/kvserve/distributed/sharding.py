"""Which part of each weight a tensor-parallel rank holds (Megatron-LM's split, as vLLM and SGLang do it).

Per decoder layer, two all-reduces and nothing else crosses ranks:

    column-parallel (output rows split):  q/k/v (by head), gate/up (by MLP row)
    row-parallel (input columns split):   o_proj (by head), down (by MLP row)  -> all-reduce of the sum

Rank r of N holds query heads [r Hq/N, (r+1) Hq/N). Key/value heads: Hkv/N each when N divides Hkv;
when Hkv < N, each KV head is replicated on N/Hkv ranks (rank r holds head r // (N/Hkv)), so every
rank's query heads find their group's KV head locally. The KV cache follows: a rank stores only its
KV heads, so its bytes per token are 1/N of the model's (1/Hkv when replicated).

The vocabulary is split in N contiguous ranges of ceil(V/N) rows (the last may be shorter): the
embedding looks up the ids in its range and zeroes the rest (an all-reduce completes each row), the
LM head computes its range's logits, and rank 0 gathers them.

A row-parallel bias is added once: rank 0 keeps it, the others hold zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvserve.models.model_config import ModelConfig
from kvserve.models.quantized import GROUP, QuantizedWeight

# The last two parts of an HF weight name -> (how it is split, along what). "even": the dimension in
# N equal parts (heads of one width, MLP rows); "kv_heads": with replication when Hkv < N. Weights
# not named here (norms, q_a/kv_a projections of MLA, MoE routers) are replicated.
_SPLIT = {
    "q_proj": ("column", "even"),
    "k_proj": ("column", "kv_heads"),
    "v_proj": ("column", "kv_heads"),
    "q_b_proj": ("column", "even"),  # MLA: per head [qk_dim]
    "kv_b_proj": ("column", "even"),  # MLA: per head [nope_dim + v_dim]
    "o_proj": ("row", "even"),
    "gate_proj": ("column", "even"),  # also a routed expert's (experts.{e}.gate_proj) and shared experts'
    "up_proj": ("column", "even"),
    "down_proj": ("row", "even"),
    "embed_tokens": ("column", "vocab"),
    "lm_head": ("column", "vocab"),
}


@dataclass(frozen=True)
class TensorShard:
    """Rank `rank` of `world_size`'s share of a model. ValueError (at construction) for a model the
    split does not fit: heads or MLP rows that N does not divide, KV heads neither a multiple nor a
    divisor of N."""

    rank: int
    world_size: int
    config: ModelConfig  # the whole model's

    def __post_init__(self) -> None:
        c, n = self.config, self.world_size
        if c.num_heads % n:
            raise ValueError(f"tensor_parallel_size {n} does not divide the model's {c.num_heads} attention heads")
        if not c.is_mla and c.num_kv_heads % n and n % c.num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {n} must divide the model's {c.num_kv_heads} KV heads or be a multiple of it"
            )
        if c.intermediate_size % n:
            raise ValueError(f"tensor_parallel_size {n} does not divide the MLP's {c.intermediate_size} rows")
        moe = c.hf_config.get("moe_intermediate_size") if c.is_mla else None
        if moe and moe % n:
            raise ValueError(f"tensor_parallel_size {n} does not divide the experts' {moe} rows")
        if vocab_shard_size(c.vocab_size, n) * (n - 1) >= c.vocab_size:
            raise ValueError(
                f"tensor_parallel_size {n} leaves a rank without any of the {c.vocab_size} vocabulary rows"
            )

    # ---- ranges

    @property
    def q_heads(self) -> tuple[int, int]:
        per = self.config.num_heads // self.world_size
        return self.rank * per, (self.rank + 1) * per

    @property
    def kv_heads(self) -> tuple[int, int]:
        heads, n = self.config.num_kv_heads, self.world_size
        if heads >= n:
            per = heads // n
            return self.rank * per, (self.rank + 1) * per
        head = self.rank // (n // heads)  # replicated: n / heads ranks share each KV head
        return head, head + 1

    @property
    def vocab_rows(self) -> tuple[int, int]:
        per = vocab_shard_size(self.config.vocab_size, self.world_size)
        start = min(self.rank * per, self.config.vocab_size)
        return start, min(start + per, self.config.vocab_size)

    @property
    def kv_rows(self) -> tuple[int, int]:
        """The rows of k_proj / v_proj (and their biases) this rank holds: its KV heads'."""
        a, b = self.kv_heads
        return a * self.config.head_dim, b * self.config.head_dim

    def local_config(self) -> ModelConfig:
        """The config this rank's model is built with: its heads, MLP (and experts') rows and vocabulary rows.
        MLA keeps its one latent KV "head" whole: the latent cache is replicated on every rank."""
        c, n = self.config, self.world_size
        q, kv, vocab = self.q_heads, self.kv_heads, self.vocab_rows
        hf = dict(c.hf_config)
        if c.is_mla and hf.get("moe_intermediate_size"):
            hf["moe_intermediate_size"] //= n
        return dataclasses.replace(
            c,
            num_heads=q[1] - q[0],
            num_kv_heads=c.num_kv_heads if c.is_mla else kv[1] - kv[0],
            intermediate_size=c.intermediate_size // n,
            vocab_size=vocab[1] - vocab[0],
            hf_config=hf,
        )

    # ---- weights

    def shard_weights(
        self, weights: Iterator[tuple[str, torch.Tensor | QuantizedWeight]]
    ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """HF-named weights (Llama family or DeepSeek), each cut to this rank's part as it arrives: one
        whole tensor is held at a time, never the whole model."""
        for name, tensor in weights:
            parts = name.removeprefix("model.").split(".")
            if parts[-2:] == ["experts", "gate_up_proj"]:  # routed experts fused: [E, 2I, hidden]
                a, b = self._even(name, tensor.shape[1] // 2)
                half = tensor.shape[1] // 2
                tensor = torch.cat((tensor[:, a:b], tensor[:, half + a : half + b]), dim=1)
            elif parts[-2:] == ["experts", "down_proj"]:  # [E, hidden, I]
                a, b = self._even(name, tensor.shape[2])
                tensor = tensor[:, :, a:b].contiguous()
            elif len(parts) >= 2 and parts[-2] in _SPLIT:
                how, along = _SPLIT[parts[-2]]
                is_bias = parts[-1] == "bias"
                if along == "vocab":
                    span = self.vocab_rows
                elif along == "kv_heads":
                    span = self.kv_rows
                elif how == "row" and is_bias:
                    span = (0, 0)  # not cut: rank 0 keeps it whole
                else:
                    span = self._even(name, tensor.shape[0] if how == "column" else tensor.shape[1])
                tensor = self._cut(name, tensor, how, span, is_bias)
            yield name, tensor

    def _even(self, name: str, size: int) -> tuple[int, int]:
        if size % self.world_size:
            raise ValueError(f"tensor_parallel_size {self.world_size} does not divide {name}'s {size} rows")
        per = size // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def _cut(self, name: str, tensor, how: str, span: tuple[int, int], is_bias: bool):
        a, b = span
        if how == "column":  # output rows; a bias follows its rows
            if isinstance(tensor, QuantizedWeight):
                return tensor.row_range(a, b)
            return tensor[a:b].contiguous()
        if is_bias:  # a row-parallel bias: summed once, by rank 0
            return tensor if self.rank == 0 else torch.zeros_like(tensor)
        if isinstance(tensor, QuantizedWeight):
            if a % GROUP or b % GROUP:
                raise ValueError(
                    f"tensor_parallel_size {self.world_size}: {name} is quantized in {GROUP}-element groups, and "
                    f"each rank's {b - a} of its {tensor.in_features} inputs are not whole groups"
                )
            return tensor.column_range(a, b)
        return tensor[:, a:b].contiguous()


def vocab_shard_size(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size)
