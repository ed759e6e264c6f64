"""`kvserve kv-plan`: how much KV cache a model needs per token, and what a memory budget holds.

Bytes per token come from the architecture alone: layers x KV heads x head dim x 2 (K and V)
x dtype bytes for MHA/GQA, layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes for MLA,
whose cache holds one compressed latent per token instead of per-head keys and values.
The paging view then shows what the budget holds as fixed-size blocks, next to a contiguous
allocation of max_model_len per sequence (the waste paging removes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from kvserve.config import parse_size
from kvserve.distributed.sharding import TensorShard
from kvserve.kv.quant import num_open_slots, value_groups, window_bytes_per_slot, window_dtype
from kvserve.models.model_config import ModelConfig

# Published config.json values (only the fields ModelConfig.from_hf_dict reads, plus MLA dims).
# fmt: off
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "max_position_embeddings": 8192}
_DEEPSEEK_MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}
PRESETS: dict[str, dict] = {
    # Llama-2-7B: plain MHA (every query head has its own K and V), for contrast with GQA and MLA.
    "llama-2-7b": {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
                   "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "max_position_embeddings": 4096},
    "llama-3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    # Qwen2.5-7B-Instruct's config (the base model's says 131072 positions).
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "max_position_embeddings": 32768},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "max_position_embeddings": 32768, "sliding_window": 4096},
    "deepseek-v2-lite": {"architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400, "hidden_size": 2048,
                         "intermediate_size": 10944, "num_hidden_layers": 27, "num_attention_heads": 16,
                         "num_key_value_heads": 16, "max_position_embeddings": 163840, "q_lora_rank": None,
                         **_DEEPSEEK_MLA},
    "deepseek-v3": {"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280, "hidden_size": 7168,
                    "intermediate_size": 18432, "num_hidden_layers": 61, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "max_position_embeddings": 163840, "q_lora_rank": 1536,
                    **_DEEPSEEK_MLA},
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
                     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
                     "tie_word_embeddings": True},
}
# fmt: on

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8": 1}
# kvserve's quantized KV (kv/quant.py): values fp32 scales per token per KV head; keys an fp32 scale and
# center per channel per block, and each running sequence's window of its last two blocks' K and V in
# fp16/bf16 (GQA/MHA); the MLA latent one fp32 scale per token per layer.
SCALE_BYTES = 4
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 128
DEFAULT_SEQ_LENS = (512, 2048, 8192)


@dataclass
class KVBytes:
    per_layer: int
    total: int
    formula: str
    scale_bytes: int = 0  # part of `total` spent on int8/fp8 scales
    expanded_mha: int = 0  # bytes/token if every query head cached its own K and V (plain MHA)


@dataclass
class SeqFit:
    seq_len: int
    blocks_per_seq: int
    paged_seqs: int  # sequences of seq_len that fit in blocks
    contiguous_seqs: int  # sequences that fit when each reserves max_model_len up front
    paged_over_contiguous: float | None  # None when not even one contiguous sequence fits


@dataclass
class Plan:
    model: str
    architecture: str
    attention: str  # MHA, GQA, MQA or MLA
    layers: int
    kv_heads: int | None  # None for MLA: one latent per token, shared by all heads
    head_dim: int  # per KV head, or the latent width (kv_lora_rank + rope dim) for MLA
    kv_cache_dtype: str
    kv: KVBytes
    budget_bytes: int
    block_size: int
    block_bytes: int
    num_blocks: int
    num_tokens: int
    max_model_len: int
    sequences: list[SeqFit] = field(default_factory=list)
    model_dtype: str = ""
    dtype_note: str = ""  # why auto chose model_dtype
    window_bytes: int = 0  # budget kept for running sequences' recent windows (quantized GQA/MHA)
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # as the engine would run with this budget
    # Tensor parallelism: the budget, kv and blocks above are one rank's (each holds its KV heads of every
    # token; MLA's latent, which has no heads to split, whole); whole_model_bytes is one token's on all ranks
    # (more than the model's own bytes where KV heads or the latent are replicated).
    tensor_parallel_size: int = 1
    model_kv_heads: int | None = None
    whole_model_bytes: int = 0


def attention_kind(config: ModelConfig) -> str:
    if config.is_mla:
        return "MLA"
    if config.num_kv_heads == config.num_heads:
        return "MHA"
    return "MQA" if config.num_kv_heads == 1 else "GQA"


def kv_width(config: ModelConfig) -> int:
    if config.is_mla:
        return config.hf_config["kv_lora_rank"] + config.hf_config["qk_rope_head_dim"]
    return config.head_dim


def kv_bytes_per_token(config: ModelConfig, dtype: str, block_size: int = DEFAULT_BLOCK_SIZE) -> KVBytes:
    """KV cache bytes one token takes, for a cache dtype in DTYPE_BYTES (int8/fp8 include their scales,
    a block's key parameters spread over its block_size tokens)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown KV dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}")
    nbytes, layers = DTYPE_BYTES[dtype], config.num_layers
    quantized = dtype in ("int8", "fp8")
    data = config.kv_bytes_per_token(nbytes)
    if config.is_mla:
        hf = config.hf_config
        latent, rope = hf["kv_lora_rank"], hf["qk_rope_head_dim"]
        scales = layers * SCALE_BYTES if quantized else 0  # one scale for the token's whole latent
        formula = f"{layers} layers x ({latent} latent + {rope} rope) x {nbytes} B"
        if quantized:
            formula += f" + {layers} layers x {SCALE_BYTES} B scale"
        # The same attention without the latent: every head caches its own K (nope + rope) and V.
        heads, k_dim, v_dim = config.num_heads, hf["qk_nope_head_dim"] + rope, hf["v_head_dim"]
        expanded = layers * heads * ((k_dim + v_dim) * nbytes + (2 * SCALE_BYTES if quantized else 0))
    else:
        kv_heads = config.num_kv_heads
        key_params = 2 * config.head_dim * SCALE_BYTES // block_size  # a block's K scale and center, per token
        value_scales = SCALE_BYTES * value_groups(config.head_dim)  # per token, per 32 channels
        scales = layers * kv_heads * (value_scales + key_params) if quantized else 0
        formula = f"{layers} layers x {kv_heads} KV heads x {config.head_dim} head dim x 2 (K, V) x {nbytes} B"
        if quantized:
            formula += (
                f" + {layers} layers x {kv_heads} KV heads x ({value_scales} B V scales"
                f" + 2 x {config.head_dim} x {SCALE_BYTES} B K scale and center / {block_size}-token block)"
            )
        # GQA shares each KV head among num_heads / num_kv_heads query heads; MHA would not.
        expanded = (data + scales) * config.num_heads // kv_heads
    total = data + scales
    return KVBytes(total // layers, total, f"{formula} = {total:,}", scales, expanded)


def default_seq_lens(max_model_len: int) -> list[int]:
    return sorted({n for n in DEFAULT_SEQ_LENS if n < max_model_len} | {max_model_len})


def plan(
    config: ModelConfig,
    budget_bytes: int,
    dtype: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_model_len: int | None = None,
    seq_lens: list[int] | None = None,
    name: str = "",
    model_dtype: str = "bfloat16",
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    tensor_parallel_size: int = 1,
) -> Plan:
    """What `budget_bytes` of KV cache in `dtype` holds, paged in blocks vs contiguous per sequence.
    A quantized GQA/MHA cache first sets aside what the engine does (engine.py): a recent window (K and
    V of the last two blocks, kv/quant.py) per running sequence, at most half the budget (fewer
    sequences otherwise). With tensor_parallel_size N the budget is each rank's, and a rank caches its
    share of the KV heads (distributed/sharding.py): ValueError for a model N does not split."""
    max_model_len = max_model_len or config.max_position_embeddings
    whole_model = config
    if tensor_parallel_size > 1:
        config = TensorShard(0, tensor_parallel_size, config).local_config()  # every rank's KV is the same size
    if budget_bytes <= 0 or block_size <= 0 or max_model_len <= 0:
        raise ValueError("budget, block size and max_model_len must be positive")
    if seq_lens and any(n <= 0 or n > max_model_len for n in seq_lens):
        raise ValueError(f"sequence lengths must be in 1..max_model_len ({max_model_len})")
    kv = kv_bytes_per_token(config, dtype, block_size)
    block_bytes = block_size * kv.total
    window_bytes = 0
    if dtype in ("int8", "fp8") and not config.is_mla:
        slot = window_bytes_per_slot(
            config.num_layers, config.num_kv_heads, config.head_dim, block_size, getattr(torch, model_dtype)
        )
        max_num_seqs = num_open_slots(max_num_seqs, budget_bytes, slot)
        window_bytes = max_num_seqs * slot
    num_blocks = max(0, budget_bytes - window_bytes) // block_bytes
    # A contiguous allocator reserves max_model_len for every sequence, however short it turns out.
    contiguous = budget_bytes // (max_model_len * kv.total)
    fits = []
    for n in seq_lens or default_seq_lens(max_model_len):
        per_seq = math.ceil(n / block_size)
        paged = num_blocks // per_seq
        fits.append(SeqFit(n, per_seq, paged, contiguous, paged / contiguous if contiguous else None))
    return Plan(
        model=name or config.architecture,
        architecture=config.architecture,
        attention=attention_kind(whole_model),
        layers=config.num_layers,
        kv_heads=None if config.is_mla else config.num_kv_heads,
        head_dim=kv_width(config),
        kv_cache_dtype=dtype,
        kv=kv,
        budget_bytes=budget_bytes,
        block_size=block_size,
        block_bytes=block_bytes,
        num_blocks=num_blocks,
        num_tokens=num_blocks * block_size,
        max_model_len=max_model_len,
        sequences=fits,
        model_dtype=model_dtype,
        window_bytes=window_bytes,
        max_num_seqs=max_num_seqs,
        tensor_parallel_size=tensor_parallel_size,
        model_kv_heads=None if whole_model.is_mla else whole_model.num_kv_heads,
        whole_model_bytes=kv.total * tensor_parallel_size,  # every rank holds the same bytes per token
    )


def preset_config(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig.from_hf_dict(PRESETS[key])


def resolve_dtype(dtype: str, is_preset: bool, cuda: bool) -> tuple[str, str]:
    """The model dtype the KV cache follows under --kv-cache-dtype auto, and why."""
    if dtype != "auto":
        return dtype, ""
    if is_preset or cuda:
        return "bfloat16", "auto: presets and GPUs run in bf16"
    return "float32", "auto: kvserve's default on CPU"


def _window_dtype_name(model_dtype: str) -> str:
    return str(window_dtype(getattr(torch, model_dtype))).removeprefix("torch.")


def _note(note: str) -> str:
    return f" ({note})" if note else ""


def _human(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_plan(p: Plan) -> str:
    kv = p.kv
    per_rank = " per rank" if p.tensor_parallel_size > 1 else ""
    lines = [
        f"KV plan: {p.model} ({p.architecture}, {p.attention})",
        f"  dtype           model {p.model_dtype or p.kv_cache_dtype}{_note(p.dtype_note)}, KV cache {p.kv_cache_dtype}",
        f"  bytes/token     {kv.per_layer:,} per layer, {kv.total:,} in all ({_human(kv.total)}){per_rank}",
        f"  formula         {kv.formula}",
    ]
    if p.tensor_parallel_size > 1:
        n = p.tensor_parallel_size
        if p.kv_heads is None:
            split = "the latent has no heads to split: every rank holds all of it (replicated)"
        elif p.model_kv_heads < n:
            split = f"{p.kv_heads} of {p.model_kv_heads} KV heads, each replicated on {n // p.model_kv_heads} ranks"
        else:
            split = f"{p.kv_heads} of {p.model_kv_heads} KV heads"
        lines.append(
            f"  tensor parallel {n} ranks, each: {split}; {p.whole_model_bytes:,} B/token on all ranks together; "
            "the budget below is each rank's"
        )
    if p.attention != "MHA":
        lines.append(
            f"  {p.attention} vs {'expanded ' if p.attention == 'MLA' else ''}MHA: {kv.expanded_mha:,} B/token "
            f"with per-head K and V for all query heads: {kv.expanded_mha / kv.total:.1f}x smaller"
        )
    lines += [
        f"  budget          {_human(p.budget_bytes)} ({p.budget_bytes:,} B)",
        *(
            [
                f"  recent windows  {_human(p.window_bytes)} of it: {p.max_num_seqs} running sequences' "
                f"K and V of their last two blocks, in {_window_dtype_name(p.model_dtype)} (also kept quantized)"
            ]
            if p.window_bytes
            else []
        ),
        f"  paged           {p.num_blocks:,} blocks x {p.block_size} tokens ({_human(p.block_bytes)} each) "
        f"= {p.num_tokens:,} tokens",
        f"  contiguous      {p.sequences[0].contiguous_seqs:,} sequence(s), each reserving max_model_len "
        f"{p.max_model_len:,} tokens",
        "",
        "  sequences of each length that fit: paged (blocks as needed) vs contiguous (max_model_len each)",
        f"  {'seq len':>9}  {'blocks/seq':>10}  {'paged seqs':>10}  {'contiguous seqs':>15}  {'paged/contig':>12}",
    ]
    for s in p.sequences:
        ratio = f"{s.paged_over_contiguous:.1f}x" if s.paged_over_contiguous is not None else "n/a"
        lines.append(
            f"  {s.seq_len:>9,}  {s.blocks_per_seq:>10,}  {s.paged_seqs:>10,}  {s.contiguous_seqs:>15,}  {ratio:>12}"
        )
    return "\n".join(lines)


def format_compare(plans: list[Plan]) -> str:
    head = ("preset", "attn", "layers", "KV heads", "head dim / latent", "bytes/token", "vs MHA", "tokens in budget")
    rows = [head]
    for p in plans:
        heads = "latent" if p.kv_heads is None else str(p.kv_heads)
        cells = (p.model, p.attention, str(p.layers), heads, str(p.head_dim), f"{p.kv.total:,}")
        saving = "-" if p.attention == "MHA" else f"{p.kv.expanded_mha / p.kv.total:.1f}x smaller"
        rows.append((*cells, saving, f"{p.num_tokens:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    # Preset names left-aligned, numbers right-aligned.
    return "\n".join(
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    )


def cmd_kv_plan(args: argparse.Namespace) -> int:
    if args.model and args.preset:
        raise ValueError("give --model or --preset, not both")
    budget = parse_size(args.kv_cache_memory)
    if args.compare:
        names, is_preset = list(PRESETS), True
    elif args.preset:
        preset_config(args.preset)  # validates the name before any work
        names, is_preset = [args.preset.lower()], True
    else:
        names, is_preset = [None], False

    model_dtype, note = resolve_dtype(args.dtype, is_preset, torch.cuda.is_available())
    kv_dtype = model_dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
    plans: list[Plan] = []
    unsplit: list[str] = []  # --compare: presets --tensor-parallel-size does not split
    for name in names:
        if name is None:
            from kvserve.models.loader import load_model_config
            from kvserve.models.paths import resolve_model_path

            path = resolve_model_path(args.model)
            config, name = load_model_config(path), os.path.basename(path.rstrip("/"))
        else:
            config = preset_config(name)
        max_len = args.max_model_len
        if max_len and args.compare:  # one length for all presets, capped at each one's context
            max_len = min(max_len, config.max_position_embeddings)
        try:
            p = plan(
                config, budget, kv_dtype, args.block_size, max_len, args.seq_len, name, model_dtype,
                args.max_num_seqs, args.tensor_parallel_size,
            )  # fmt: skip
        except ValueError as exc:
            if not args.compare:
                raise
            unsplit.append(f"{name}: {exc}")
            continue
        p.dtype_note = note
        plans.append(p)
    if args.json:
        data = [asdict(p) for p in plans]
        print(json.dumps(data if args.compare else data[0], indent=2))
    elif args.compare:
        tp = f" per rank of {args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
        print(
            f"model {model_dtype}{_note(note)}, KV cache {kv_dtype}, budget {_human(budget)}{tp}, "
            f"block {args.block_size}"
        )
        print(format_compare(plans))
        for line in unsplit:
            print(f"not split: {line}")
    else:
        print(format_plan(plans[0]))
    return 0


def add_kv_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("kv-plan", help="KV cache bytes per token and what a memory budget holds")
    p.add_argument("--model", default=None, help="a Hugging Face model folder or .gguf (default: SmolLM2-135M)")
    p.add_argument("--preset", default=None, help=f"a published architecture: {', '.join(PRESETS)}")
    p.add_argument("--kv-cache-memory", default="8GiB", help="KV cache budget (default 8GiB)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16", "int8", "fp8"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto: bfloat16 for presets and on CUDA, float32 for a local model on CPU")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS,
                   help="running sequences (int8/fp8 keep each one's last two blocks in a 16-bit window)")  # fmt: skip
    p.add_argument("--seq-len", type=int, action="append", default=None,
                   help="sequence length to fit (repeatable; default 512, 2048, 8192, max_model_len)")  # fmt: skip
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="N ranks: KV bytes and blocks per rank (each holds its share of the KV heads)")  # fmt: skip
    p.add_argument("--compare", action="store_true", help="all presets in one table")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_kv_plan)
