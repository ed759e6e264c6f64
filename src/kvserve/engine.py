"""Engine: the step loop (schedule -> forward -> sample -> update).

One Engine.step():
    batch  = scheduler.schedule()            which requests, how many tokens each
    logits = runner.execute(batch)           one forward over the flat batch
    tokens = sampler(logits, rows)           one token per sequence that reached its end
    update: append tokens, detokenize, check stops, fork parallel samples, free finished
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from kvserve.config import EngineConfig
from kvserve.distributed.block_io import ShardedBlockIO
from kvserve.distributed.group import RankFailed
from kvserve.distributed.sharding import TensorShard
from kvserve.distributed.workers import TensorParallelRanks, is_worker_node, start_ranks, under_torchrun
from kvserve.heap import load_outside_the_heap, settle_heap
from kvserve.kv.block_io import BlockIO
from kvserve.kv.events import KVEventLog, KVEventPublisher
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.offload import TieredKVStore
from kvserve.kv.prefix_hash import root_hash
from kvserve.kv.quant import QUANTIZED_FORMAT, num_open_slots, plain_kv_dtype
from kvserve.kv_state import MAX_CELLS, TREE_ROOTS, KVStateTracker
from kvserve.models.layers import WORKSPACE
from kvserve.models.loader import load_model_config
from kvserve.models.paths import resolve_model_path
from kvserve.outputs import CompletionOutput, RequestMetrics, RequestOutput, SequenceDelta
from kvserve.request import Request, RequestStatus
from kvserve.runner import ModelRunner, default_kv_cache_memory, load_model
from kvserve.sampler import Sampler, SamplingRow
from kvserve.sampling_params import SamplingParams, StructuredOutputsParams
from kvserve.scheduler import Scheduler, SchedulerOutput
from kvserve.structured_outputs import GrammarCache, fill_bitmask
from kvserve.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("kvserve")


@dataclass
class RequestGroup:
    """The n sequences of one request and what is needed to report on them."""

    request_id: str
    prompt: str | None
    sequences: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    texts: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)


@dataclass
class EngineStats:
    num_generated_tokens: int = 0
    num_computed_prefill_tokens: int = 0  # prompt (and recomputed) tokens actually run through the model
    num_steps: int = 0
    # Where steps' time went (kv_state.py's step split): scheduling, the forward (with the logits), and
    # the rest (sampling, detokenizing, stop checks, forks). Three clock reads a step.
    schedule_seconds: float = 0.0
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0


class StepFailed(RuntimeError):
    """A step raised; its requests were aborted and the engine can go on."""

    def __init__(self, outputs: dict[str, RequestOutput], cause: BaseException) -> None:
        super().__init__(
            f"the engine step running this request failed ({type(cause).__name__}: {cause}); other requests go on"
        )
        self.outputs = outputs  # request id -> its output up to the failed step
        self.cause = cause


class Engine:
    def __init__(self, config: EngineConfig | None = None, **engine_args) -> None:
        self.config = config = config or EngineConfig(**engine_args)
        path = resolve_model_path(config.model)
        self.model_path = path
        model_config = load_model_config(path)
        config.resolve(model_config.max_position_embeddings)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)

        start = time.perf_counter()
        self.tp: TensorParallelRanks | None = None
        if config.tensor_parallel_size > 1:
            self.tp = self._start_tensor_parallel(config, path, model_config)
        try:
            with load_outside_the_heap():
                self._load(config, path, model_config)
        except BaseException:
            if self.tp is not None:
                self.tp.close()
            raise
        logger.info(
            "model %s (%s) on %s/%s loaded in %.1fs; KV cache (%s): %d blocks x %d tokens = %d tokens, "
            "%.0f B/token, %.1f MiB (+ %.1f MiB of recent windows)%s",
            os.path.basename(path),
            self.model_config.architecture,
            config.torch_device,
            config.dtype,
            time.perf_counter() - start,
            config.kv_cache_dtype if config.kv_cache_dtype != "auto" else config.dtype,
            self.kv.pool.num_blocks,
            config.block_size,
            self.kv.pool.num_blocks * config.block_size,
            self._bytes_per_block / config.block_size,
            self.kv.pool.num_blocks * self._bytes_per_block / 2**20,
            self.kv.num_open_slots * self._window_bytes / 2**20,
            f", per rank of {config.tensor_parallel_size}" if self.tp is not None else "",
        )

    def _start_tensor_parallel(self, config: EngineConfig, path: str, model_config) -> TensorParallelRanks:
        if is_worker_node(config):
            raise ValueError("only rank 0 runs the engine; the other ranks run distributed.workers.run_node_workers")
        if config.torch_device.type == "cuda" and config.torch_device.index not in (None, 0):
            raise ValueError(
                "with tensor parallelism rank r runs on cuda:r: give --device cuda, and choose the GPUs with "
                "CUDA_VISIBLE_DEVICES"
            )
        if under_torchrun() and int(os.environ["WORLD_SIZE"]) != config.tensor_parallel_size:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes for tensor_parallel_size "
                             f"{config.tensor_parallel_size}")  # fmt: skip
        TensorShard(0, config.tensor_parallel_size, model_config)  # ValueError now if the model does not split
        if config.master_port is None:
            from kvserve.server.launch import free_port  # here: only tensor parallelism needs it (httpx stays out)

            config.master_port = free_port(config.master_addr)
        return start_ranks(config, path)

    def _load(self, config: EngineConfig, path: str, model_config) -> None:
        group = self.tp.group if self.tp is not None else None
        # The tokenizer first: parsing its JSON frees ~20 MB in holes between what it keeps, which the model's
        # loading then fills (loaded after the model, the holes stayed: 25 MiB free in the heap at idle
        # against 14, and a load peak 12 MiB higher).
        self.tokenizer = Tokenizer.load(path)
        self.model_config, model = load_model(path, config, group)
        if config.chat_template is not None:
            if self.tokenizer is None:
                raise ValueError("chat_template: this model has no tokenizer to render it with")
            self.tokenizer.set_chat_template(config.chat_template)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) if self.tokenizer else set()
        self.eos_token_ids |= self.model_config.eos_token_ids

        bs, dtype, kv_dtype = config.block_size, config.torch_dtype, config.kv_cache_dtype
        num_blocks, open_slots, self._bytes_per_block, self._window_bytes = kv_budget(config, model)
        if group is not None:  # every rank's budget must hold the blocks: the smallest count wins
            num_blocks, open_slots = group.min_over_ranks([num_blocks, open_slots])
        if self._window_bytes and open_slots < config.max_num_seqs:
            logger.warning(
                "kv_cache_memory %d B: %s recent windows for %d sequences would take over half of it; "
                "max_num_seqs lowered to %d",
                kv_budget_bytes(config),
                kv_dtype,
                config.max_num_seqs,
                open_slots,
            )
            config.max_num_seqs = open_slots
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {kv_budget_bytes(config)} B holds no {config.block_size}-token block")
        capacity = num_blocks * config.block_size
        if config.max_model_len > capacity:
            if config.max_model_len != model_config.max_position_embeddings:
                raise ValueError(
                    f"max_model_len {config.max_model_len} needs more KV than kv_cache_memory holds "
                    f"({capacity} tokens): raise kv_cache_memory or lower max_model_len"
                )
            config.max_model_len = capacity  # the default shrinks to what one request can hold
        self.fingerprint = model_fingerprint(path, self.model_config)
        plain = plain_kv_dtype(kv_dtype, dtype) is not None
        kv_format = config.kv_cache_dtype if plain else f"{kv_dtype}:{QUANTIZED_FORMAT}"
        # How the weights are held (quantized blocks, int8, dense) changes the K/V a little: part of the key.
        weights_form = "quantized" if any(getattr(m, "qweight", None) is not None for m in model.modules()) else "dense"
        parts = [self.fingerprint, str(config.torch_dtype), kv_format, str(config.block_size)]
        parts.append(f"{weights_form}:{config.quantization}")
        if group is not None:  # a block's rows (the tiers') hold every rank's shard: N ranks read them back
            parts.append(f"tensor_parallel:{group.world_size}")
        root = root_hash(*parts)
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching, root, open_slots)
        self.scheduler = Scheduler(config, self.kv)
        self.runner = ModelRunner(config, model, num_blocks, open_slots, self.kv, group)
        if config.offload_enabled:
            block_io = BlockIO(self.runner.kv_caches)
            if group is not None:
                block_io = ShardedBlockIO(block_io, group)
            self.kv.attach_offload(
                TieredKVStore(
                    block_io,
                    config.block_size,
                    host_bytes=config.kv_offload_memory,
                    disk_dir=config.kv_offload_dir,
                    disk_bytes=config.kv_offload_disk,
                )
            )
            logger.info(
                "KV offload tiers: %s (%d B per block)",
                ", ".join(f"{t.name} {t.capacity_bytes / 2**20:.0f} MiB" for t in self.kv.offload.tiers),
                block_io.row_nbytes,
            )
        self.kv_events: KVEventPublisher | None = None
        if config.kv_events_endpoint is not None:
            self._start_kv_events(config)
        self.sampler = Sampler()
        vocab = self.model_config.vocab_size
        self.grammars = GrammarCache(self.tokenizer, vocab, self.eos_token_ids) if self.tokenizer else None
        self.groups: dict[str, RequestGroup] = {}
        self.stats = EngineStats()
        self.state_tracker = KVStateTracker()
        self._next_id = 0
        settle_heap()

    # ------------------------------------------------------------------ requests

    def new_request_id(self) -> str:
        self._next_id += 1
        return f"req-{self._next_id}"

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_text: str | None = None,
    ) -> str:
        """Validates and queues a request; raises ValueError (and queues nothing) on bad input."""
        params = params or SamplingParams()
        request_id = request_id or self.new_request_id()
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.encode_prompt(prompt)
        if isinstance(prompt, str):
            prompt_text = prompt
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab}); got {max(params.logit_bias)}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.compile_grammar(params.structured_outputs)  # cached: the server compiled it already
        max_len = self.config.max_model_len
        if len(prompt_ids) > max_len or (len(prompt_ids) == max_len and params.max_tokens != 0):
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; this model's maximum context length is {max_len} tokens"
            )
        max_tokens = max_len - len(prompt_ids) if params.max_tokens is None else params.max_tokens
        if len(prompt_ids) + max_tokens > max_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds this model's maximum "
                f"context length of {max_len} tokens"
            )
        params._eos_token_ids = self.eos_token_ids
        sequences = []
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.config.torch_device)
                generator.manual_seed(params.seed + index)
            sequence = Request(request_id, prompt_ids, params, max_tokens=max_tokens, index=index, generator=generator)
            if grammar is not None:
                sequence.grammar = self.grammars.matcher(grammar)  # one per sample: each follows its own tokens
            sequences.append(sequence)
        first = sequences[0]
        for child in sequences[1:]:
            child.fork_parent = first
        first.pending_forks = sequences[1:]
        detoks = [self._detokenizer(prompt_ids, params) for _ in sequences]
        self.groups[request_id] = RequestGroup(
            request_id, prompt_text, sequences, detoks, texts=[""] * params.n, finished=[False] * params.n
        )
        self.scheduler.add(first)
        return request_id

    def compile_grammar(self, spec: StructuredOutputsParams):
        """spec's compiled grammar, from the cache or compiled now; ValueError if it does not compile.
        Thread-safe: the server calls it from a worker thread before submitting, so that the engine
        thread finds it compiled and never waits on a compile."""
        if self.grammars is None:
            raise ValueError("structured_outputs need a tokenizer; this model has none")
        return self.grammars.compile(spec)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give the prompt as token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:3]}")
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )

    def abort(self, request_id: str) -> None:
        """Stops a request wherever it is and frees its blocks at once; unknown ids are ignored."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for seq in group.sequences:
            if not seq.status.finished:
                self.scheduler.finish(seq, RequestStatus.FINISHED_ABORTED)
        self._release_when_idle()

    def _release_when_idle(self) -> None:
        """Once nothing is left to run (a step finished the last request, or it was aborted), the steps'
        reused buffers (models/layers.py's Workspace) go back to the OS."""
        if not self.has_unfinished():
            WORKSPACE.release()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def waiting_since(self, before: float) -> list[str]:
        """Ids of the requests that have waited since before `before` (time.monotonic()) without ever being
        scheduled (a preempted request has run, and is not counted). Oldest first."""
        return [
            r.request_id
            for r in self.scheduler.waiting
            if r.status is RequestStatus.WAITING and r.arrival_time < before
        ]

    # ------------------------------------------------------------------ the step

    def step(self) -> list[SequenceDelta]:
        """One engine step: schedule, run the model, sample, detokenize. If anything after scheduling
        raises (the model, the sampler, a detokenizer, a grammar), the requests of this step are aborted,
        their blocks freed, and StepFailed names them: the engine stays consistent and can step on, the
        requests that were not in the step untouched."""
        if self.tp is not None:
            self.tp.group.check()  # RankFailed for good once a collective failed: the ranks are out of step
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        self.stats.schedule_seconds += time.perf_counter() - start
        if batch.empty:
            self.publish_kv_events()
            return []
        try:
            if self.tp is not None:
                self.tp.alive()
            return self._run(batch)
        except RankFailed:  # not this step's fault, and no step can run after it: the caller must stop
            raise
        except Exception as exc:
            failed = sorted({request.request_id for request, _ in batch.scheduled} & self.groups.keys())
            outputs = {request_id: self.request_output(request_id) for request_id in failed}  # as far as they got
            for request_id in failed:
                self.abort(request_id)
            raise StepFailed(outputs, exc) from exc
        finally:
            self.publish_kv_events()
            self._release_when_idle()

    def _run(self, batch: SchedulerOutput) -> list[SequenceDelta]:
        self.stats.num_steps += 1
        start = time.perf_counter()
        result = self.runner.execute(batch)
        forward_end = time.perf_counter()
        self.stats.forward_seconds += forward_end - start
        try:
            return self._update(batch, result)
        finally:
            self.stats.sample_seconds += time.perf_counter() - forward_end

    def _update(self, batch: SchedulerOutput, result) -> list[SequenceDelta]:
        """After the forward: prompt logprobs and embeddings kept, blocks cached, tokens sampled and added."""
        for request, num_new in batch.scheduled:
            # every token but a decode of the newest generated token is prefill (prompt or recomputation)
            is_decode = request.output_token_ids and request.num_computed_tokens + num_new == request.num_tokens
            self.stats.num_computed_prefill_tokens += num_new - (1 if is_decode else 0)
            lps = result.prompt_logprobs.get(id(request))
            if lps is not None:  # logprobs of prompt positions num_computed + 1 ...; index = position
                if not request.prompt_logprobs:
                    request.prompt_logprobs.append(None)  # the first prompt token has no logprob
                # a preempted request recomputes its prompt: keep only positions not recorded yet
                known = len(request.prompt_logprobs) - (request.num_computed_tokens + 1)
                request.prompt_logprobs.extend(lps[max(0, known) :])
            sums = result.hidden_sums.get(id(request))
            if sums is not None:
                first_pos, hidden_sum = sums
                request.hidden_sum = hidden_sum if first_pos == 0 else request.hidden_sum + hidden_sum
            request.num_computed_tokens += num_new
            self.kv.cache_computed_blocks(request)
        self.kv.flush_offload()
        deltas: dict[tuple[str, int], SequenceDelta] = {}
        rows, row_requests, logit_rows = [], [], []
        for row, request in enumerate(result.sample_requests):
            if request.max_tokens == 0:  # echo-only or an embedding: the prompt computed, nothing to generate
                if request.params.embed:
                    mean = request.hidden_sum / request.num_prompt_tokens
                    request.embedding = torch.nn.functional.normalize(mean, dim=0).tolist()
                self._finish(request, RequestStatus.FINISHED_LENGTH, None, deltas)
                continue
            family = [request]
            if request.pending_forks and not request.output_token_ids:
                family += request.pending_forks  # parallel samples draw their first token from this row
            for seq in family:
                rows.append(SamplingRow(seq.params, seq.prompt_token_ids, seq.output_token_ids, seq.generator))
                row_requests.append(seq)
                logit_rows.append(row)
        if rows:
            logits = result.logits
            if len(logit_rows) != logits.shape[0] or logit_rows != list(range(len(logit_rows))):
                logits = logits[torch.tensor(logit_rows, device=logits.device)]
            constrained = [i for i, seq in enumerate(row_requests) if seq.grammar is not None]
            allowed = None
            if constrained:
                matchers = {i: row_requests[i].grammar for i in constrained}
                allowed = (constrained, fill_bitmask(matchers, len(rows), self.model_config.vocab_size))
            sampled = self.sampler(logits, rows, allowed, logits_writable=True)  # not read after this
            now = time.monotonic()
            refused = []
            for seq, token, lp in zip(row_requests, sampled.token_ids, sampled.logprobs):
                seq.output_token_ids.append(token)
                if seq.grammar is not None and not seq.grammar.accept_token(token):
                    # cannot happen while the mask holds: every allowed token is one the matcher accepts
                    logger.error("request %s: token %d was refused by its grammar", seq.request_id, token)
                    refused.append(seq)
                if lp is not None:
                    seq.output_logprobs.append(lp)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                self.stats.num_generated_tokens += 1
            for seq in row_requests:
                if seq.fork_parent is not None and seq.status == RequestStatus.WAITING:
                    self._fork(seq)
            for seq, lp in zip(row_requests, sampled.logprobs):
                self._after_token(seq, lp, deltas)
            for seq in refused:
                if not seq.status.finished:
                    self._finish(seq, RequestStatus.FINISHED_ABORTED, "grammar_error", deltas)
        return list(deltas.values())

    def _fork(self, child: Request) -> None:
        parent = child.fork_parent
        child.fork_parent = None
        parent.pending_forks = []
        if len(self.scheduler.running) < self.config.max_num_seqs:
            try:
                copy = self.kv.fork(parent, child)
            except RankFailed:  # from a tier's gather of an evicted block: not "no block free"
                raise
            except RuntimeError:
                copy = False
            if copy is not False:
                if copy is not None:
                    self.runner.copy_blocks([copy])
                self.runner.copy_window(self.kv, parent, child)
                child.num_computed_tokens = parent.num_prompt_tokens
                self.scheduler.add_running(child)
                return
        self.scheduler.add(child)  # no room to share: it recomputes its prompt (mostly from the prefix cache)

    def _after_token(self, seq: Request, logprobs: dict | None, deltas: dict) -> None:
        token = seq.output_token_ids[-1]
        group = self.groups[seq.request_id]
        detok = group.detokenizers[seq.index]
        text = detok.add_token(token) if detok is not None else ""
        delta = deltas.setdefault(
            (seq.request_id, seq.index),
            SequenceDelta(seq.request_id, seq.index, [], "", [] if seq.params.logprobs is not None else None, None),
        )
        delta.token_ids.append(token)
        delta.text += text
        if delta.logprobs is not None and logprobs is not None:
            delta.logprobs.append(logprobs)
        group.texts[seq.index] += text

        params = seq.params
        num_out = seq.num_output_tokens
        stop_reason: int | str | None = None
        status = None
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif token in params.stop_token_ids:
                status, stop_reason = RequestStatus.FINISHED_STOPPED, token
            elif detok is not None and detok.stopped:
                status, stop_reason = RequestStatus.FINISHED_STOPPED, detok.stop_string
        if status is None and seq.grammar is not None and seq.grammar.is_terminated():
            status = RequestStatus.FINISHED_STOPPED  # the grammar's end: it accepted an end-of-sequence token
        if status is None and (num_out >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self._finish(seq, status, stop_reason, deltas)

    def _finish(self, seq: Request, status: RequestStatus, stop_reason, deltas: dict) -> None:
        group = self.groups[seq.request_id]
        detok = group.detokenizers[seq.index]
        delta = deltas.setdefault(
            (seq.request_id, seq.index),
            SequenceDelta(seq.request_id, seq.index, [], "", [] if seq.params.logprobs is not None else None, None),
        )
        if detok is not None and not detok.stopped:
            tail = detok.flush()
            delta.text += tail
            group.texts[seq.index] += tail
        seq.stop_reason = stop_reason
        seq.finish_time = time.monotonic()
        if seq.first_token_time is not None:  # the dashboard's TTFT series (kv_state.py)
            self.state_tracker.record_ttft(time.time(), seq.first_token_time - seq.arrival_time)
        self.scheduler.finish(seq, status)
        group.finished[seq.index] = True
        delta.finish_reason = status.value
        delta.stop_reason = stop_reason

    # ------------------------------------------------------------------ results

    def request_output(self, request_id: str) -> RequestOutput:
        group = self.groups[request_id]
        first = group.sequences[0]
        outputs = []
        for seq, text in zip(group.sequences, group.texts):
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(seq.output_token_ids),
                    logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
                    finish_reason=seq.status.value if seq.status.finished else None,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=request_id,
            prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=outputs,
            prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None else None,
            num_cached_tokens=first.num_cached_tokens,
            metrics=RequestMetrics(first.arrival_time, first.first_token_time, first.finish_time),
            embedding=first.embedding,
        )

    def pop_finished(self, request_id: str) -> RequestOutput:
        output = self.request_output(request_id)
        del self.groups[request_id]
        return output

    def is_finished(self, request_id: str) -> bool:
        return all(self.groups[request_id].finished)

    def close(self) -> None:
        """Waits for background work (disk-tier writes, KV events) and stops the tensor-parallel ranks;
        the engine must not step after it."""
        try:
            if self.kv.offload is not None:
                if self.tp is not None and self.tp.group.broken:
                    self.kv.offload.flush = lambda: None  # its last writes would gather from ranks out of step
                self.kv.offload.close()  # its last writes gather blocks from every rank: before they stop
            if self.kv_events is not None:
                self.publish_kv_events()
                self.kv_events.close()
        finally:
            if self.tp is not None:
                self.tp.close()

    # ------------------------------------------------------------------ KV events

    def _start_kv_events(self, config: EngineConfig) -> None:
        """Binds the publisher (ValueError if it cannot) and opens with AllBlocksCleared, then what the
        disk tier holds from earlier runs: a consumer that knew an earlier process starts over."""
        self.kv_events = KVEventPublisher(config.kv_events_endpoint, config.kv_events_replay_endpoint)
        log = KVEventLog(config.block_size)
        log.cleared()
        self.kv.pool.events = log
        if self.kv.offload is not None:
            self.kv.offload.attach_events(log)
        self.publish_kv_events()

    def publish_kv_events(self) -> None:
        """Hands the events gathered since the last call to the publisher (never blocks)."""
        if self.kv_events is not None:
            self.kv_events.publish(self.kv.pool.events.take())

    def kv_state(self, max_cells: int = MAX_CELLS, tree_roots: int = TREE_ROOTS) -> dict:
        """The KV cache's live state (kv_state.py): a few ms on a big pool, so a few times a second at most."""
        return self.state_tracker.build(self, max_cells, tree_roots)

    def check_idle(self) -> None:
        """Asserts the idle invariant: no request left, every block free or cached-and-evictable."""
        assert not self.scheduler.has_unfinished()
        self.kv.pool.check_idle()
        assert not self.kv.block_tables, f"block tables left: {list(self.kv.block_tables)[:5]}"
        assert not self.kv.open_slots and len(self.kv.free_open_slots) == self.kv.num_open_slots


def kv_budget_bytes(config: EngineConfig) -> int:
    return config.kv_cache_memory or default_kv_cache_memory(config.torch_device)


def kv_budget(config: EngineConfig, model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(KV blocks, recent-window slots, bytes per block, bytes per window slot) that this process's
    budget holds for its model (a tensor-parallel rank's: its shard of the KV heads)."""
    bs, dtype, kv_dtype = config.block_size, config.torch_dtype, config.kv_cache_dtype
    bytes_per_block = model.kv_bytes_per_block(bs, dtype, kv_dtype)
    budget = kv_budget_bytes(config)
    # A quantized cache keeps each running sequence's last two blocks in a 16-bit window too
    # (kv/quant.py), charged to the same budget; at most half of it, or fewer sequences run.
    window_bytes = model.window_bytes_per_slot(bs, dtype, kv_dtype)
    open_slots = num_open_slots(config.max_num_seqs, budget, window_bytes) if window_bytes else 0
    num_blocks = (budget - open_slots * window_bytes) // bytes_per_block
    return num_blocks, open_slots, bytes_per_block, window_bytes


def model_fingerprint(path: str, model_config) -> str:
    """Identifies the weights, for prefix-cache (and disk-tier) keys: the architecture, plus each weight
    file's name, size and sha256 of its first and last MiB (cheap, and stable across restarts)."""
    h = hashlib.sha256()
    numbers = {k: v for k, v in vars(model_config).items() if k != "hf_config" and not isinstance(v, set)}
    h.update(json.dumps(numbers, sort_keys=True, default=str).encode())
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".gguf")))
    )
    for file in files:
        size = os.path.getsize(file)
        h.update(f"{os.path.basename(file)}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()
