"""DeepSeek mixture-of-experts MLP: a router picks top-k routed experts per token, plus shared experts.

    y = sum_{e in topk(x)} w_e(x) * expert_e(x)  +  shared_experts(x)

Routers, as transformers defines them (HF `mlp.gate`):
- DeepSeek-V2 (softmax scores): `greedy` top-k, or `group_limited_greedy` (experts in n_group
  groups; only the topk_group groups with the best single expert compete). Weights are the softmax
  scores times routed_scaling_factor (transformers' V2 does not renormalise the top-k).
- DeepSeek-V3 (`noaux_tc`, sigmoid scores): experts are chosen on score + e_score_correction_bias
  (the load-balancing bias), within the topk_group groups whose best two biased scores sum
  highest; weights are the unbiased scores, renormalised when norm_topk_prob, times
  routed_scaling_factor.
Routing runs in fp32 (the router weight stays fp32, as in HF), whatever the model dtype.

Experts are stored fused as HF holds them in memory: gate_up_proj [E, 2I, hidden] and down_proj
[E, hidden, I]; checkpoints' per-expert `experts.{e}.gate_proj` etc. are copied into slices.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kvserve.distributed.group import ParallelGroup
from kvserve.models.layers import SwiGLU
from kvserve.models.model_config import ModelConfig


class TopKRouter(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hf = config.hf_config
        self.num_experts: int = hf["n_routed_experts"]
        self.top_k: int = hf["num_experts_per_tok"]
        self.routed_scaling_factor = float(hf.get("routed_scaling_factor", 1.0))
        self.num_groups: int = hf.get("n_group") or 1
        self.topk_group: int = hf.get("topk_group") or self.num_groups
        if config.architecture == "DeepseekV3ForCausalLM":
            self.method = "noaux_tc"
            self.norm_topk_prob = bool(hf.get("norm_topk_prob", True))
            self.e_score_correction_bias = nn.Parameter(torch.empty(self.num_experts, dtype=torch.float32), False)
        else:
            self.method = hf.get("topk_method") or "greedy"
            if self.method not in ("greedy", "group_limited_greedy"):
                raise ValueError(
                    f"DeepSeek-V2 topk_method {self.method!r} is not supported (greedy, group_limited_greedy)"
                )
        if self.method != "greedy" and self.num_experts % self.num_groups:
            raise ValueError(f"n_routed_experts {self.num_experts} is not a multiple of n_group {self.num_groups}")
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> weights [T, k] fp32, expert ids [T, k]."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        if self.method == "noaux_tc":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias  # the bias steers which experts, not their weights
            group_scores = self._grouped(choice).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
            ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(dim=-1)
            if self.method == "group_limited_greedy":
                group_scores = self._grouped(scores).max(dim=-1).values  # [T, G]
                scores = scores.masked_fill(~self._group_mask(group_scores), 0.0)
            weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        return weights * self.routed_scaling_factor, ids

    def _grouped(self, scores: torch.Tensor) -> torch.Tensor:  # [T, E] -> [T, G, E/G]
        return scores.view(scores.shape[0], self.num_groups, self.num_experts // self.num_groups)

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[T, G] -> [T, E] bool: True for experts in each token's topk_group best groups."""
        top = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
        return mask.repeat_interleave(self.num_experts // self.num_groups, dim=1)


class Experts(nn.Module):
    """The routed experts (SwiGLU each). Tokens are grouped by expert, so each selected expert runs
    once, as one matrix product over all its tokens, rather than once per token."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, hidden]; weights, ids [T, k] -> [T, hidden]."""
        top_k = ids.shape[1]
        flat_ids = ids.flatten()  # [T*k], assignment a = token * k + slot
        order = flat_ids.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # one host sync per layer
        tokens = order // top_k  # [T*k] token of each sorted assignment
        grouped = x.index_select(0, tokens)  # [T*k, hidden]
        out = torch.empty_like(grouped)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            gate, up = F.linear(grouped[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)  # [n, I] each
            out[rows] = F.linear(F.silu(gate) * up, self.down_proj[expert])  # [n, hidden]
            start += count
        out *= weights.flatten()[order].unsqueeze(1).to(out.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, out)


class DeepseekMoE(nn.Module):
    """HF `mlp` of a DeepSeek MoE layer: gate (router), experts, shared_experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hf = config.hf_config
        inter = hf["moe_intermediate_size"]
        self.gate = TopKRouter(config)
        self.experts = Experts(hf["n_routed_experts"], config.hidden_size, inter)
        shared = hf.get("n_shared_experts") or 0
        self.shared_experts = SwiGLU(config.hidden_size, inter * shared) if shared else None
        self.tp: ParallelGroup | None = None  # tensor parallelism: this rank's rows of every expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        weights, ids = self.gate(x)
        y = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y if self.tp is None else self.tp.all_reduce(y)  # routed and shared partial sums at once


def is_moe_layer(config: ModelConfig, layer_idx: int) -> bool:
    """DeepSeek's rule: the first first_k_dense_replace layers are dense, then every moe_layer_freq-th
    is MoE (transformers reads no moe_layer_freq; every published checkpoint has 1, where both agree)."""
    hf = config.hf_config
    return (
        bool(hf.get("n_routed_experts"))
        and layer_idx >= (hf.get("first_k_dense_replace") or 0)
        and layer_idx % (hf.get("moe_layer_freq") or 1) == 0
    )
