"""ModelRunner: owns the model and the KV cache; turns a scheduled batch into one forward pass.

Per step it builds the flat batch metadata once (input ids, positions, slot
mapping, decode block tables and masks, prefill spans), runs the model over all
T tokens together (no padding), and computes logits only for the rows that
sample a token (the last token of each request that reaches its end) plus,
for requests that asked for them, the prompt positions whose logprobs are due.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from types import ModuleType

import torch

from kvserve import kernels
from kvserve.config import EngineConfig
from kvserve.distributed.group import OP_COPY_BLOCKS, OP_COPY_WINDOW, ParallelGroup, RankFailed
from kvserve.distributed.sharding import TensorShard
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.quant import as_bytes, block_tensors
from kvserve.models.attention import (
    AttentionMetadata,
    DecodeCascade,
    KeyWrites,
    PrefillSpan,
    WindowBlocks,
    block_tables_and_mask,
    decode_reads_in_place,
)
from kvserve.models.layers import WORKSPACE, use_cpu_kernels
from kvserve.models.llama import LlamaForCausalLM
from kvserve.models.loader import load_model_config, load_weights
from kvserve.models.model_config import ModelConfig
from kvserve.request import Request
from kvserve.sampler import compute_logprobs
from kvserve.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sample_requests: list[Request] = field(default_factory=list)  # one per logits row
    logits: torch.Tensor | None = None  # [len(sample_requests), V] float32
    # request -> logprob dicts for the prompt positions computed this step (None for position 0)
    prompt_logprobs: dict[int, list[dict[int, float] | None]] = field(default_factory=dict)
    # embedding requests: request -> (first position, float32 sum of the final hidden states of this step's
    # positions of it); the engine adds it to request.hidden_sum, or starts over from position 0
    hidden_sums: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)


@dataclass
class StepPlan:
    """One step's flat batch as plain integers: everything a rank needs to run the forward. Rank 0 builds
    it from the scheduled requests; tensor-parallel workers receive it (distributed/protocol.py) and hold
    no request objects. Decodes come first, then prefill spans (attention.py)."""

    input_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    slots: list[int] = field(default_factory=list)  # [T] cache slot of each token's new K/V
    decode_tables: list[list[int]] = field(default_factory=list)  # per decode, its block table
    decode_lens: list[int] = field(default_factory=list)  # per decode, its context with the new token
    window_slots: list[int] = field(default_factory=list)  # quantized caches: per decode, its window slot ...
    window_starts: list[int] = field(default_factory=list)  # ... and the first position it wrote there
    key_spans: list[tuple[int, int, int, list[int], int, int]] = field(default_factory=list)  # KeyWrites.plan's
    # per prefill: (flat start, first position, end position, blocks of its earlier context when it has
    # some (else empty), window slot (-1 without windows), first position written into that slot)
    prefills: list[tuple[int, int, int, list[int], int, int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # flat rows whose logits are sampled ...
    logprob_rows: list[int] = field(default_factory=list)  # ... and then the prompt-logprob rows

    @property
    def logit_rows(self) -> list[int]:
        return self.sample_rows + self.logprob_rows


_Span = tuple[Request, int, int, int]  # (request, flat start, first position, count)


def compute_kernels(config: EngineConfig) -> ModuleType | None:
    """The compiled forward kernels (kvserve/kernels) when they apply: they take fp32 on the CPU;
    anything else runs the PyTorch path."""
    if config.torch_device.type == "cpu" and config.torch_dtype == torch.float32:
        return kernels.compute_ops()
    return None


def load_model(path: str, config: EngineConfig, tp: ParallelGroup | None = None) -> tuple[ModelConfig, torch.nn.Module]:
    """The model with its weights, on config's device. Linear weights: a GGUF's quantized blocks stay
    quantized where the compiled kernels run them (quantization auto, fp32 on the CPU), else they are
    expanded to the dtype once at load (none; and auto on CUDA, in bf16, or without the kernels, where
    expanding per product would be slow); int8 quantizes every float weight (models/quantized.py).
    With a tensor-parallel group, the model is this rank's shard (distributed/sharding.py); the
    ModelConfig returned is the whole model's."""
    mla = load_model_config(path).is_mla
    if mla and config.quantization == "int8":
        raise ValueError(
            "quantization int8 is implemented for Llama-family models, not for multi-head latent attention"
        )
    if mla and config.kv_cache_dtype == "float16":
        raise ValueError(
            "kv_cache_dtype float16 is implemented for Llama-family models, not for multi-head latent attention"
            " (use auto, or int8)"
        )
    ops = compute_kernels(config)
    keep_quantized = config.quantization == "auto" and ops is not None and not mla
    model_config, weights = load_weights(path, keep_quantized)
    shard = None
    if tp is not None:
        shard = TensorShard(tp.rank, tp.world_size, model_config)
        weights = shard.shard_weights(weights)
        tp.vocab_size = model_config.vocab_size
    built_config = shard.local_config() if shard is not None else model_config
    if mla:
        from kvserve.models.deepseek import DeepseekForCausalLM as model_class
    else:
        model_class = LlamaForCausalLM
    max_positions = built_config.max_position_embeddings
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.torch_dtype)
    try:
        if mla:  # built on the meta device (no random init, no transient fp32 copy), then allocated for real
            with torch.device("meta"):
                model = model_class(built_config, max_positions)
            model = model.to_empty(device=config.torch_device)
            model.init_non_persistent(config.torch_device)
        else:
            # Llama's layers (models/layers.py) leave their weights uninitialized: built where they run, they
            # touch no memory until loaded, and a quantized weight's dense one never does. (The meta device
            # would cost ~75 MB of RSS in the machinery its first use imports.)
            with torch.device(config.torch_device):
                model = model_class(built_config, max_positions)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        if mla:
            model.load_weights(weights)
        else:
            model.load_weights(weights, config.quantization)
    model.eval()
    use_cpu_kernels(model, ops)
    if shard is not None:
        model.set_tensor_parallel(tp, shard.vocab_rows[0])
    return model_config, model


class ModelRunner:
    # Decodes that share cached leading blocks attend them once, together (DecodeCascade), where decode
    # attention gathers each row's blocks (the plain PyTorch path, CUDA): the shared part is gathered once.
    # Not where the compiled kernels read the blocks in place (the CPU, kvserve/kernels): there a shared
    # prefix costs no copy, stays in cache across the rows that read it, and the cascade only adds its
    # gathers and drops the step out of the compiled decode stack. Measured on the default model (Zen 4,
    # 32 decodes sharing a 400-token prefix, 64 tokens each): 277 tok/s with it, 479 without (float16
    # cache; fp32 318/454, int8 178/276), and its gather buffers kept 36 MB. None: that rule; True or
    # False force it (tests, benchmarks).
    cascade_attention: bool | None = None

    def __init__(
        self,
        config: EngineConfig,
        model: torch.nn.Module,
        num_blocks: int,
        num_open_slots: int,
        kv: KVCacheManager | None = None,
        tp: ParallelGroup | None = None,
    ) -> None:
        """kv: rank 0's block manager, which plans steps (None on a tensor-parallel worker, which only
        runs the plans it receives); tp: the tensor-parallel group, None without one."""
        self.config = config
        self.model = model
        self.kv = kv
        self.tp = tp
        self.device = config.torch_device
        self.block_size = config.block_size
        self.kv_caches = model.allocate_kv_cache(
            num_blocks, config.block_size, config.torch_dtype, config.kv_cache_dtype, num_open_slots
        )
        self.windows = num_open_slots > 0  # a quantized cache, with a recent window per sequence
        if config.kv_cache_dtype == "int8" and self.device.type == "cpu":
            kernels.cpu_ops()  # built (once per machine) or loaded now, not inside the first step
        self.compute_ops = compute_kernels(config)  # attention's compiled decode path
        self.decodes_read_in_place = decode_reads_in_place(self.kv_caches[0], self.compute_ops, config.torch_dtype)

    @property
    def uses_cascade(self) -> bool:
        """cascade_attention where it is set, else the rule: where decodes gather their blocks."""
        return self.cascade_attention if self.cascade_attention is not None else not self.decodes_read_in_place

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> RunnerOutput:
        plan, sample_requests, prompt_lp_spans, embed_spans = self.plan(batch)
        hidden, logits = self.run(plan)
        out = RunnerOutput(sample_requests=sample_requests)
        num_sampled = len(sample_requests)
        if num_sampled:
            out.logits = logits[:num_sampled]
        row = num_sampled  # logits rows of the prompt logprob spans follow the sampled ones, in order
        for request, _, first_pos, count in prompt_lp_spans:
            out.prompt_logprobs[id(request)] = self._prompt_logprobs(logits[row : row + count], request, first_pos)
            row += count
        for request, flat_start, first_pos, count in embed_spans:
            out.hidden_sums[id(request)] = (first_pos, hidden[flat_start : flat_start + count].float().sum(0))
        return out

    def plan(self, batch: SchedulerOutput) -> tuple[StepPlan, list[Request], list[_Span], list[_Span]]:
        """The step as a StepPlan, with what only rank 0 keeps: the requests that sample (one per
        sampled logits row), and the (request, flat start, first position, count) spans of prompt
        logprobs and of embeddings."""
        # Decodes (single-token queries) first, then prefill spans; see attention.py.
        decodes = [(r, n) for r, n in batch.scheduled if n == 1]
        prefills = [(r, n) for r, n in batch.scheduled if n > 1]
        bs = self.block_size
        plan = StepPlan()
        sample_requests: list[Request] = []
        prompt_lp_spans: list[_Span] = []
        embed_spans: list[_Span] = []
        for request, _ in decodes:
            pos = request.num_computed_tokens
            table = self.kv.block_ids(request)
            plan.input_ids.append(request.token_at(pos))
            plan.positions.append(pos)
            plan.slots.append(table[pos // bs] * bs + pos % bs)
            plan.decode_tables.append(table)
            plan.decode_lens.append(pos + 1)
            if self.windows:
                plan.window_slots.append(self.kv.open_slot(request))
                plan.window_starts.append(self.kv.window_start(request, pos))
                flat = len(plan.input_ids) - 1
                plan.key_spans.append((flat, pos, pos + 1, table, plan.window_slots[-1], plan.window_starts[-1]))
            if pos + 1 == request.num_tokens:
                plan.sample_rows.append(len(plan.input_ids) - 1)
                sample_requests.append(request)
            elif request.params.prompt_logprobs is not None and pos + 1 < request.num_prompt_tokens:
                prompt_lp_spans.append((request, len(plan.input_ids) - 1, pos, 1))
            if request.params.embed:  # a one-token chunk of an embedding request's prompt
                embed_spans.append((request, len(plan.input_ids) - 1, pos, 1))
        for request, n in prefills:
            start = request.num_computed_tokens
            end = start + n
            flat_start = len(plan.input_ids)
            table = self.kv.block_ids(request)
            plan.input_ids.extend(request.tokens(start, end))
            plan.positions.extend(range(start, end))
            plan.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            slot, first = (
                (self.kv.open_slot(request), self.kv.window_start(request, start)) if self.windows else (-1, 0)
            )
            if self.windows:
                plan.key_spans.append((flat_start, start, end, table, slot, first))
            context = table[: -(-end // bs)] if start > 0 else []  # earlier context: its blocks are gathered
            plan.prefills.append((flat_start, start, end, context, slot, first))
            if request.params.prompt_logprobs is not None:
                count = min(end, request.num_prompt_tokens - 1) - start
                if count > 0:
                    prompt_lp_spans.append((request, flat_start, start, count))
            if request.params.embed:
                embed_spans.append((request, flat_start, start, n))
            if end == request.num_tokens:
                plan.sample_rows.append(len(plan.input_ids) - 1)
                sample_requests.append(request)
        for _, flat_start, _, count in prompt_lp_spans:
            plan.logprob_rows.extend(range(flat_start, flat_start + count))
        return plan, sample_requests, prompt_lp_spans, embed_spans

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward over the plan's tokens: the final hidden states [T, hidden] and the float32 logits
        of plan.logit_rows (None when there are none, and on tensor-parallel ranks other than 0). With
        tensor parallelism, rank 0 first sends the plan to the other ranks, which run this too."""
        meta = self.metadata(plan)  # built before the plan goes out: an error here must not strand the workers
        if self.tp is None:
            return self._forward(plan, meta)
        if self.tp.rank == 0:
            self.tp.send_step(plan)
        try:
            return self._forward(plan, meta)
        except RankFailed:
            raise
        except BaseException as exc:  # the other ranks are in this step's collectives: out of step for good
            failure = self.tp.fail(f"tensor-parallel rank {self.tp.rank} failed in a step: {exc!r}", exc)
            if isinstance(exc, Exception):
                raise failure from exc
            raise  # KeyboardInterrupt and the like stay what they are; the group is broken either way

    def _forward(self, plan: StepPlan, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.device
        hidden = self.model(
            torch.tensor(plan.input_ids, device=device),
            torch.tensor(plan.positions, device=device),
            self.kv_caches,
            meta,
        )
        WORKSPACE.end_step()  # before the logits: buffers this step did not use are not kept through them
        rows = plan.logit_rows
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=device)]) if rows else None
        return hidden, logits

    def metadata(self, plan: StepPlan) -> AttentionMetadata:
        bs, device = self.block_size, self.device
        spans: list[PrefillSpan] = []
        for flat_start, start, end, context, slot, first in plan.prefills:
            span = PrefillSpan(start=flat_start, num_tokens=end - start, context_len=end)
            if context:
                span.block_ids = torch.tensor(context, device=device)
                q_pos = torch.arange(start, end, device=device)
                span.mask = (torch.arange(end, device=device)[None, :] <= q_pos[:, None])[None, None]
                if self.windows:
                    span.window = WindowBlocks.of_rows([end], [slot], [first], bs, device)
            spans.append(span)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(plan.slots, device=device),
            num_decode_tokens=len(plan.decode_lens),
            prefills=spans,
            compute_ops=self.compute_ops,
        )
        if self.windows:
            meta.key_writes = KeyWrites.plan(plan.key_spans, bs, device)
        if plan.decode_lens:
            tables, lens = plan.decode_tables, plan.decode_lens
            meta.decode_block_tables, meta.decode_mask = block_tables_and_mask(tables, lens, bs, device)
            windows = (plan.window_slots, plan.window_starts) if self.windows else None
            if windows is not None:
                meta.decode_window = WindowBlocks.of_rows(lens, *windows, bs, device)
            if self.uses_cascade:
                meta.decode_cascade = DecodeCascade.build(tables, lens, bs, device, windows)
        return meta

    def _prompt_logprobs(self, logits: torch.Tensor, request: Request, first_pos: int) -> list[dict[int, float] | None]:
        """Logprobs of prompt tokens first_pos+1 .. first_pos+len(logits), from the logits at the positions
        before them."""
        count = logits.shape[0]
        targets = torch.tensor(request.prompt_token_ids[first_pos + 1 : first_pos + 1 + count], device=self.device)
        top_n = request.params.prompt_logprobs
        token_lp, top_lp, top_ids = compute_logprobs(logits, targets, top_n)
        result: list[dict[int, float] | None] = []
        for target, lp, ids, lps in zip(targets.tolist(), token_lp.tolist(), top_ids.tolist(), top_lp.tolist()):
            entry = dict(zip(ids, lps))
            entry[target] = lp
            result.append(entry)
        return result

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copies whole blocks src -> dst in every layer (forked parallel samples); every rank its shard."""
        if not pairs:
            return
        if self.tp is not None and self.tp.rank == 0:
            self.tp.send(OP_COPY_BLOCKS, torch.tensor([s for s, _ in pairs] + [d for _, d in pairs]))
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for cache in self.kv_caches:
            for tensor in map(as_bytes, block_tensors(cache)):
                tensor[:, dst] = tensor[:, src]

    def copy_window(self, kv: KVCacheManager, parent: Request, child: Request) -> None:
        """A forked sample reads its parent's last blocks from its own window: a copy of the parent's."""
        if self.windows:
            self.copy_window_slot(kv.open_slot(parent), kv.open_slot(child))

    @torch.inference_mode()
    def copy_window_slot(self, src: int, dst: int) -> None:
        if self.tp is not None and self.tp.rank == 0:
            self.tp.send(OP_COPY_WINDOW, torch.tensor([src, dst]))
        for cache in self.kv_caches:
            cache.window[:, dst] = cache.window[:, src]


def default_kv_cache_memory(device: torch.device) -> int:
    """A sensible share of free memory: on CUDA 85% of what is free after the weights; on the CPU
    an eighth of available RAM, at most 1 GiB: the CPU is compute-bound long before it fills more
    (1 GiB is ~23k tokens of SmolLM2 in fp32), and zeroing a bigger cache slows start-up."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    available = _available_ram()
    return int(min(available // 8, 1024**3))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
