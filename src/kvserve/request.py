"""Request: one sequence being generated, and the length invariants it carries.

    0 <= num_computed_tokens <= num_tokens <= max_model_len
    num_tokens = len(prompt_token_ids) + len(output_token_ids)

num_computed_tokens counts tokens whose K/V are in the cache. The scheduler moves
it toward num_tokens; a request samples a new token in the step where it
reaches num_tokens. Parallel sampling (n > 1) makes n Requests that share the
prompt's KV blocks: the first computes the prompt, the others fork from it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against max_model_len
    index: int = 0  # which of the n parallel samples this is
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of its full blocks
    # Parallel sampling: siblings wait for the first sequence's prompt, then fork from it.
    fork_parent: Request | None = None
    pending_forks: list[Request] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    # structured outputs: this sequence's xgrammar GrammarMatcher (structured_outputs.py), advanced by every
    # token it generates; kept through preemption, which recomputes KV but never the tokens
    grammar: Any = None
    # embedding requests (params.embed): the sum of the final hidden states of prompt positions computed so far
    # (float32; a recomputation after preemption starts it again), then the pooled, normalized embedding
    hidden_sum: Any = None
    embedding: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def check_invariants(self, max_model_len: int) -> None:
        assert 0 <= self.num_computed_tokens <= self.num_tokens <= max_model_len, (
            self.request_id,
            self.num_computed_tokens,
            self.num_tokens,
            max_model_len,
        )
