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
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.quant import as_bytes, block_tensors
from kvserve.models.attention import (
    AttentionMetadata,
    DecodeCascade,
    KeyWrites,
    PrefillSpan,
    WindowBlocks,
    block_tables_and_mask,
)
from kvserve.models.layers import use_cpu_kernels
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


def compute_kernels(config: EngineConfig) -> ModuleType | None:
    """The compiled forward kernels (kvserve/kernels) when they apply: they take fp32 on the CPU;
    anything else runs the PyTorch path."""
    if config.torch_device.type == "cpu" and config.torch_dtype == torch.float32:
        return kernels.compute_ops()
    return None


def load_model(path: str, config: EngineConfig) -> tuple[ModelConfig, torch.nn.Module]:
    """The model with its weights, on config's device. Linear weights: a GGUF's quantized blocks stay
    quantized where the compiled kernels run them (quantization auto, fp32 on the CPU), else they are
    expanded to the dtype once at load (none; and auto on CUDA, in bf16, or without the kernels, where
    expanding per product would be slow); int8 quantizes every float weight (models/quantized.py)."""
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
    if mla:
        from kvserve.models.deepseek import DeepseekForCausalLM as model_class
    else:
        model_class = LlamaForCausalLM
    max_positions = model_config.max_position_embeddings
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.torch_dtype)
    try:
        if mla:  # built on the meta device (no random init, no transient fp32 copy), then allocated for real
            with torch.device("meta"):
                model = model_class(model_config, max_positions)
            model = model.to_empty(device=config.torch_device)
            model.init_non_persistent(config.torch_device)
        else:
            # Llama's layers (models/layers.py) leave their weights uninitialized: built where they run, they
            # touch no memory until loaded, and a quantized weight's dense one never does. (The meta device
            # would cost ~75 MB of RSS in the machinery its first use imports.)
            with torch.device(config.torch_device):
                model = model_class(model_config, max_positions)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        if mla:
            model.load_weights(weights)
        else:
            model.load_weights(weights, config.quantization)
    model.eval()
    use_cpu_kernels(model, ops)
    return model_config, model


class ModelRunner:
    cascade_attention = True  # decodes attend shared leading blocks once; False only to measure against

    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, model: torch.nn.Module, kv: KVCacheManager
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.model = model
        self.kv = kv
        self.device = config.torch_device
        self.block_size = config.block_size
        self.kv_caches = model.allocate_kv_cache(
            kv.pool.num_blocks, config.block_size, config.torch_dtype, config.kv_cache_dtype, kv.num_open_slots
        )
        self.windows = kv.num_open_slots > 0  # a quantized cache, with a recent window per sequence
        if config.kv_cache_dtype == "int8" and self.device.type == "cpu":
            kernels.cpu_ops()  # built (once per machine) or loaded now, not inside the first step
        self.compute_ops = compute_kernels(config)  # attention's compiled decode path

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> RunnerOutput:
        # Decodes (single-token queries) first, then prefill spans; see attention.py.
        decodes = [(r, n) for r, n in batch.scheduled if n == 1]
        prefills = [(r, n) for r, n in batch.scheduled if n > 1]
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_requests: list[Request] = []
        prompt_lp_spans: list[tuple[Request, int, int, int]] = []  # (request, flat start, first pos, count)
        embed_spans: list[tuple[Request, int, int, int]] = []  # the same, for embedding requests' positions

        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        window_slots: list[int] = []  # decodes' window slots ...
        window_starts: list[int] = []  # ... and the first positions they wrote there
        key_spans: list[tuple[int, int, int, list[int], int, int]] = []  # KeyWrites.plan's input
        for request, _ in decodes:
            pos = request.num_computed_tokens
            table = self.kv.block_ids(request)
            input_ids.append(request.token_at(pos))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            decode_tables.append(table)
            decode_lens.append(pos + 1)
            if self.windows:
                window_slots.append(self.kv.open_slot(request))
                window_starts.append(self.kv.window_start(request, pos))
                key_spans.append((len(input_ids) - 1, pos, pos + 1, table, window_slots[-1], window_starts[-1]))
            if pos + 1 == request.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_requests.append(request)
            elif request.params.prompt_logprobs is not None and pos + 1 < request.num_prompt_tokens:
                prompt_lp_spans.append((request, len(input_ids) - 1, pos, 1))
            if request.params.embed:  # a one-token chunk of an embedding request's prompt
                embed_spans.append((request, len(input_ids) - 1, pos, 1))

        spans: list[PrefillSpan] = []
        for request, n in prefills:
            start = request.num_computed_tokens
            end = start + n
            flat_start = len(input_ids)
            table = self.kv.block_ids(request)
            input_ids.extend(request.tokens(start, end))
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            span = PrefillSpan(start=flat_start, num_tokens=n, context_len=end)
            if start > 0:
                num_blocks = -(-end // bs)
                span.block_ids = torch.tensor(table[:num_blocks], device=self.device)
                q_pos = torch.arange(start, end, device=self.device)
                span.mask = (torch.arange(end, device=self.device)[None, :] <= q_pos[:, None])[None, None]
            if self.windows:
                slot, first = self.kv.open_slot(request), self.kv.window_start(request, start)
                key_spans.append((flat_start, start, end, table, slot, first))
                if span.block_ids is not None:
                    span.window = WindowBlocks.of_rows([end], [slot], [first], bs, self.device)
            spans.append(span)
            if request.params.prompt_logprobs is not None:
                count = min(end, request.num_prompt_tokens - 1) - start
                if count > 0:
                    prompt_lp_spans.append((request, flat_start, start, count))
            if request.params.embed:
                embed_spans.append((request, flat_start, start, n))
            if end == request.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_requests.append(request)

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            num_decode_tokens=len(decodes),
            prefills=spans,
            compute_ops=self.compute_ops,
        )
        if self.windows:
            meta.key_writes = KeyWrites.plan(key_spans, bs, self.device)
        if decodes:
            meta.decode_block_tables, meta.decode_mask = block_tables_and_mask(
                decode_tables, decode_lens, bs, self.device
            )
            windows = (window_slots, window_starts) if self.windows else None
            if windows is not None:
                meta.decode_window = WindowBlocks.of_rows(decode_lens, *windows, bs, self.device)
            if self.cascade_attention:
                meta.decode_cascade = DecodeCascade.build(decode_tables, decode_lens, bs, self.device, windows)

        hidden = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            meta,
        )
        out = RunnerOutput(sample_requests=sample_requests)
        if sample_rows:
            out.logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        for request, flat_start, first_pos, count in prompt_lp_spans:
            out.prompt_logprobs[id(request)] = self._prompt_logprobs(hidden, request, flat_start, first_pos, count)
        for request, flat_start, first_pos, count in embed_spans:
            out.hidden_sums[id(request)] = (first_pos, hidden[flat_start : flat_start + count].float().sum(0))
        return out

    def _prompt_logprobs(
        self, hidden: torch.Tensor, request: Request, flat_start: int, first_pos: int, count: int
    ) -> list[dict[int, float] | None]:
        """Logprobs of prompt tokens first_pos+1 .. first_pos+count, from the logits at the positions before them."""
        logits = self.model.compute_logits(hidden[flat_start : flat_start + count])
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
        """Copies whole blocks src -> dst in every layer (forked parallel samples)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for cache in self.kv_caches:
            for tensor in map(as_bytes, block_tensors(cache)):
                tensor[:, dst] = tensor[:, src]

    @torch.inference_mode()
    def copy_window(self, kv: KVCacheManager, parent: Request, child: Request) -> None:
        """A forked sample reads its parent's last blocks from its own window: a copy of the parent's."""
        if self.windows:
            src, dst = kv.open_slot(parent), kv.open_slot(child)
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
