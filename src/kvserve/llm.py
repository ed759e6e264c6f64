"""LLM: the offline API, named as in vLLM (`LLM(model=...).generate(prompts, params)`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from tqdm import tqdm

from kvserve.config import EngineConfig
from kvserve.engine import Engine
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.tokenizer import chat_template_kwargs as checked_template_kwargs

Prompt = str | list[int]


class LLM:
    """`LLM(model=None, **engine_args)`: every EngineConfig field is a keyword (max_num_seqs=..., ...)."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_args))

    def close(self) -> None:
        """Stops the engine's background work and its tensor-parallel ranks; generate() cannot run after it."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids); outputs come back in prompt order.
        All prompts are validated before any is queued, so a bad one raises and runs nothing."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        for prompt in prompts:  # validate everything first
            self.engine.encode_prompt(prompt)
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except ValueError:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return self._run(ids, use_tqdm if use_tqdm is not None else len(ids) > 8)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, through the chat template.
        continue_final_message (with add_generation_prompt=False) continues the last message instead of
        starting a new assistant turn; chat_template_kwargs go to the template. vLLM's names."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, hence no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            tokenizer.apply_chat_template(
                c, add_generation_prompt, continue_final_message, **checked_template_kwargs(chat_template_kwargs)
            )
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def embed(self, prompts: Prompt | Sequence[Prompt], use_tqdm: bool | None = None) -> list[list[float]]:
        """One embedding per prompt (text or token ids), in prompt order: the final hidden states (after
        the model's last norm) mean-pooled over the prompt's tokens and L2-normalized, as /v1/embeddings
        returns them. Any generative model embeds; how well depends on the model (an embedding-trained
        model, e.g. a Qwen3-Embedding, pools its own way: last token)."""
        params = SamplingParams(max_tokens=0, embed=True)
        outputs = self.generate(prompts, params, use_tqdm)
        return [out.embedding for out in outputs]

    def _params_per_prompt(self, sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(count)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {count} prompts")
        return list(sampling_params)

    def _run(self, request_ids: list[str], show_progress: bool) -> list[RequestOutput]:
        engine = self.engine
        pending = set(request_ids)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generating", unit="req", disable=not show_progress)
        start = time.perf_counter()
        generated = 0
        try:
            while pending:
                deltas = engine.step()
                generated += sum(len(d.token_ids) for d in deltas)
                for request_id in {d.request_id for d in deltas if d.finish_reason is not None}:
                    if request_id in pending and engine.is_finished(request_id):
                        results[request_id] = engine.pop_finished(request_id)
                        pending.discard(request_id)
                        bar.update(1)
                if not deltas and not engine.has_unfinished() and pending:
                    for request_id in list(pending):  # finished without a token (e.g. max_tokens=0)
                        results[request_id] = engine.pop_finished(request_id)
                        pending.discard(request_id)
                bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tok/s")
        finally:
            bar.close()
            for request_id in pending:  # interrupted: leave nothing behind
                engine.abort(request_id)
        return [results[r] for r in request_ids]

    def get_stats(self) -> dict[str, float]:
        """Engine counters, including prefix-cache queries and hits in tokens, and with offload tiers
        kv_offload_<host|disk>_<hit_tokens|bytes_in|bytes_out|evictions|corrupt|used_bytes|capacity_bytes>."""
        engine = self.engine
        kv = engine.kv
        return {
            "num_blocks": kv.pool.num_blocks,
            "num_free_blocks": kv.pool.num_free_blocks,
            "prefix_cache_queries": kv.stats.queries,
            "prefix_cache_hits": kv.stats.hits,
            "prefix_cache_hit_rate": kv.stats.hit_rate,
            "num_preemptions": engine.scheduler.num_preemptions,
            "num_chunked_prefills": engine.scheduler.num_chunked_prefills,
            "num_computed_prefill_tokens": engine.stats.num_computed_prefill_tokens,
            "num_generated_tokens": engine.stats.num_generated_tokens,
            **{
                f"kv_offload_{tier}_{key}": value
                for tier, counters in (kv.offload.stats() if kv.offload is not None else {}).items()
                for key, value in counters.items()
            },
        }
