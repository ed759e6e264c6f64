"""MLA's latent KV cache vs the same model with ordinary per-head K/V caching, in one run, on the engine.

A random-weight DeepSeek-V2-style model (default: hidden 1024, 8 layers, 16 heads, kv_lora_rank 256,
rope 32, nope 64, v 64, one dense layer then 8 routed experts top-2 + 1 shared) runs twice under the
same --kv-cache-memory:

- latent: kvserve's MLA, caching [c ; k_pe] (kv_lora_rank + rope = 288 numbers per token and layer)
  and decoding in the latent space (weight absorption);
- expanded: the same weights, caching every head's K (nope + rope) and V at write time
  (16 x (96 + 64) = 2,560 numbers per token and layer) and decoding with ordinary per-head attention.

Reported: bytes per token, tokens the budget holds, and decode tokens/s for a batch of --batch
requests with --context-token prompts (timed after every prompt is prefilled, so each timed step is
one pure decode batch). Targets: >= 4x the tokens, and faster long-context decode.

    python benchmarks/mla_vs_mha.py                  # 16 x 2,000-token contexts, 3 GiB budget (a few minutes)
    python benchmarks/mla_vs_mha.py --quick          # a small model and context, to check it runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import tempfile
import time

import torch
from torch.nn import functional as F

from kvserve import LLM, SamplingParams
from kvserve.models import deepseek
from kvserve.models.attention import AttentionMetadata
from kvserve.models.mla import MLAAttention


class ExpandedMLAAttention(MLAAttention):
    """The same attention, caching per-head K [H, nope + rope] and V [H, v] for every token, and reading
    them back as kvserve's MHA path does (attention.py): per layer a K plane [num_blocks, block_size, H,
    qk_dim] and a V plane [num_blocks, block_size, H, v_dim] (two tensors, as their widths differ),
    gathered by block table with index_select and attended with one batched SDPA call."""

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        T, H = x.shape[0], self.num_heads
        k_cache, v_cache = kv_cache
        q_nope, q_pe, latent = self.project(x, cos, sin)
        c, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c).view(T, H, -1).split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(T, H, self.rope_dim)), dim=-1)  # [T, H, qk_dim]
        k_cache.view(-1, H, self.qk_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, H, self.v_dim).index_copy_(0, meta.slot_mapping, v)
        q = torch.cat((q_nope, q_pe), dim=-1)  # [T, H, qk_dim]
        out = torch.empty(T, H, self.v_dim, dtype=x.dtype, device=x.device)
        nd = meta.num_decode_tokens
        if nd:
            flat = meta.decode_block_tables.flatten()
            keys = k_cache.index_select(0, flat).view(nd, -1, H, self.qk_dim).transpose(1, 2)  # [Nd, H, L, qk]
            values = v_cache.index_select(0, flat).view(nd, -1, H, self.v_dim).transpose(1, 2)  # [Nd, H, L, v]
            attn = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, scale=self.scale
            )  # [Nd, H, 1, v]
            out[:nd] = attn[:, :, 0]
        for span in meta.prefills:
            rows = slice(span.start, span.start + span.num_tokens)
            if span.block_ids is None:
                keys, values = k[rows], v[rows]
            else:
                keys = k_cache.index_select(0, span.block_ids).flatten(0, 1)[: span.context_len]
                values = v_cache.index_select(0, span.block_ids).flatten(0, 1)[: span.context_len]
            attn = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1),
                keys.transpose(0, 1),
                values.transpose(0, 1),
                attn_mask=None if span.mask is None else span.mask[0],
                is_causal=span.mask is None,
                scale=self.scale,
            )  # [H, Tq, v]
            out[rows] = attn.transpose(0, 1)
        return self.o_proj(out.view(T, H * self.v_dim))


class ExpandedDeepseek(deepseek.DeepseekForCausalLM):
    def __init__(self, config, max_positions: int) -> None:
        super().__init__(config, max_positions)
        for layer in self.layers:
            layer.self_attn.__class__ = ExpandedMLAAttention  # same parameters, another cache and forward

    def allocate_kv_cache(self, num_blocks, block_size, dtype, kv_cache_dtype="auto", num_open_slots=0):
        if kv_cache_dtype != "auto":
            raise ValueError("the expanded comparison runs with kv_cache_dtype auto only")
        attn = self.layers[0].self_attn
        device = self.embed_tokens.weight.device
        return [
            tuple(
                torch.zeros(num_blocks, block_size, attn.num_heads, width, dtype=dtype, device=device)
                for width in (attn.qk_dim, attn.v_dim)
            )
            for _ in self.layers
        ]

    def kv_bytes_per_token(self, dtype, kv_cache_dtype="auto") -> int:
        attn = self.layers[0].self_attn
        row = attn.num_heads * (attn.qk_dim + attn.v_dim)
        return self.config.num_layers * row * torch.empty((), dtype=dtype).element_size()


@contextlib.contextmanager
def expanded_variant():
    """The runner imports kvserve.models.deepseek.DeepseekForCausalLM when it loads an MLA model."""
    original = deepseek.DeepseekForCausalLM
    deepseek.DeepseekForCausalLM = ExpandedDeepseek
    try:
        yield
    finally:
        deepseek.DeepseekForCausalLM = original


def save_model(folder: str, args: argparse.Namespace) -> None:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        q_lora_rank=None,
        kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.rope_dim,
        qk_nope_head_dim=args.nope_dim,
        v_head_dim=args.v_dim,
        n_routed_experts=args.experts,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=max(4096, args.context + args.decode_steps + 16),
        initializer_range=0.05,  # wide enough that greedy tokens are rarely near-ties
    )
    DeepseekV2ForCausalLM(config).save_pretrained(folder)


def run_variant(name: str, folder: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    llm = LLM(
        model=folder,
        kv_cache_memory=args.kv_cache_memory,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=max(len(prompts), 1),
        enable_prefix_caching=False,
        num_threads=args.num_threads,
    )
    engine = llm.engine
    bytes_per_token = engine.runner.model.kv_bytes_per_token(engine.config.torch_dtype)
    capacity = engine.kv.pool.num_blocks * engine.config.block_size
    needed = len(prompts) * -(-(args.context + args.decode_steps + 1) // engine.config.block_size)
    result = {"variant": name, "bytes_per_token": bytes_per_token, "capacity_tokens": capacity}
    if needed > engine.kv.pool.num_blocks:
        result["error"] = f"the decode run needs {needed} blocks, the budget holds {engine.kv.pool.num_blocks}"
        return result
    params = SamplingParams(temperature=0, max_tokens=args.decode_steps + 1, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    requests = [engine.groups[i].sequences[0] for i in ids]
    start = time.perf_counter()
    while any(r.num_output_tokens == 0 for r in requests):  # prefill (chunked), plus any early decodes
        engine.step()
    prefill_s = time.perf_counter() - start
    generated_before = sum(r.num_output_tokens for r in requests)
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    decode_s = time.perf_counter() - start
    decoded = sum(r.num_output_tokens for r in requests) - generated_before
    outputs = [engine.pop_finished(i).outputs[0].token_ids for i in ids]
    assert llm.get_stats()["num_preemptions"] == 0
    result |= {
        "prefill_tokens_per_s": len(prompts) * args.context / prefill_s,
        "decode_steps": steps,
        "decode_tokens_per_s": decoded / decode_s,
        "decode_step_ms": 1000 * decode_s / steps,
        "outputs": outputs,
    }
    del llm, engine
    gc.collect()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-cache-memory", default="3GiB")
    p.add_argument("--context", type=int, default=2000, help="prompt tokens per request")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-lora-rank", type=int, default=256)
    p.add_argument("--rope-dim", type=int, default=32)
    p.add_argument("--nope-dim", type=int, default=64)
    p.add_argument("--v-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="a small model and context, to check the script runs")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.quick:
        args.kv_cache_memory, args.context, args.batch, args.decode_steps = "64MiB", 256, 4, 8
        args.hidden, args.layers, args.heads, args.kv_lora_rank = 256, 2, 8, 64
        args.intermediate, args.moe_intermediate, args.experts, args.vocab = 512, 128, 4, 1024

    rng = random.Random(0)
    prompts = [[rng.randrange(3, args.vocab) for _ in range(args.context)] for _ in range(args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        save_model(folder, args)
        latent = run_variant("latent (MLA, absorbed decode)", folder, prompts, args)
        with expanded_variant():
            expanded = run_variant("expanded (per-head K/V)", folder, prompts, args)

    print(
        f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, kv_lora_rank {args.kv_lora_rank}, "
        f"rope {args.rope_dim}, nope {args.nope_dim}, v {args.v_dim}; KV budget {args.kv_cache_memory}; "
        f"decode: batch {args.batch} at {args.context}-token contexts, {args.decode_steps} steps"
    )
    print(
        f"{'variant':<32}{'B/token':>10}{'tokens in budget':>18}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>9}"
    )
    for r in (latent, expanded):
        row = f"{r['variant']:<32}{r['bytes_per_token']:>10,}{r['capacity_tokens']:>18,}"
        if "error" in r:
            print(row + f"  ({r['error']}: raise --kv-cache-memory)")
        else:
            print(
                row + f"{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>14.1f}{r['decode_step_ms']:>9.1f}"
            )
    token_ratio = latent["capacity_tokens"] / expanded["capacity_tokens"]
    print(f"tokens in the same budget: {token_ratio:.2f}x (target >= 4x: {'met' if token_ratio >= 4 else 'NOT met'})")
    if "error" not in latent and "error" not in expanded:
        speedup = latent["decode_tokens_per_s"] / expanded["decode_tokens_per_s"]
        same = sum(a == b for a, b in zip(latent["outputs"], expanded["outputs"]))
        print(f"long-context decode: {speedup:.2f}x (target > 1x: {'met' if speedup > 1 else 'NOT met'})")
        print(f"greedy outputs identical in both variants: {same}/{len(prompts)} requests (the same model)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "latent": latent, "expanded": expanded}, f, indent=1)


if __name__ == "__main__":
    main()
