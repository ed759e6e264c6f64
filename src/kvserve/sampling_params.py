"""SamplingParams: how one request's tokens are chosen, validated at construction.

Names and meanings follow vLLM's SamplingParams (and the OpenAI API), which
users already know. Every invalid value raises ValueError naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """One constraint on the generated text (vLLM's StructuredOutputsParams): exactly one of
    - json: a JSON schema (a dict, or its JSON text) the output must validate against;
    - regex: a regular expression the whole output must match;
    - choice: the output is exactly one of these strings;
    - grammar: an EBNF grammar (xgrammar's dialect, which reads GBNF) the output must derive from `root`;
    - json_object: True for any JSON object.
    disable_any_whitespace: JSON without optional whitespace (compact), for json and json_object."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(given) or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError("structured_outputs.json must be a JSON schema (an object, or its JSON text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (
            not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        if self.json_object not in (None, True):
            raise ValueError("structured_outputs.json_object must be true when given")

    @property
    def kind(self) -> str:
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical spec): what a compiled grammar is cached under."""
        kind = self.kind
        if kind == "json":
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            text = json.dumps(schema, ensure_ascii=False)  # key order kept: properties are generated in it
        elif kind == "choice":
            text = json.dumps(self.choice, ensure_ascii=False)
        elif kind == "json_object":
            text = ""
        else:
            text = getattr(self, kind)
        if kind in ("json", "json_object") and self.disable_any_whitespace:
            kind += ":compact"
        return kind, text


MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling, in [-100, 100]
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None  # a dict is converted
    # An embedding request (LLM.embed, /v1/embeddings): the result is the prompt's last hidden states (after
    # the final norm) mean-pooled and L2-normalized, RequestOutput.embedding; nothing is generated, so it
    # needs max_tokens == 0 and n == 1. Every prompt position is computed (no prefix-cache hits).
    embed: bool = False
    # Filled by the engine, not by users: EOS ids of the model (from its config).
    _eos_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if isinstance(self.structured_outputs, dict):
            unknown = set(self.structured_outputs) - {f for f in StructuredOutputsParams.__dataclass_fields__}
            if unknown:
                raise ValueError(f"structured_outputs has unknown fields: {', '.join(sorted(unknown))}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict of its fields")
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(message)

        need(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(self.n <= 128, f"n must be <= 128, got {self.n}")
        need(
            _is_number(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0, got {self.temperature!r}",
        )
        need(_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(
            isinstance(self.top_k, int) and self.top_k >= 0,
            f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k!r}",
        )
        need(_is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
        )
        need(
            _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}",
        )
        need(
            _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}",
        )
        need(
            self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed and self.seed + self.n <= 2**63),
            f"seed must be a 64-bit integer (n samples use seed .. seed + n - 1), got {self.seed!r}",
        )
        need(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
            f"max_tokens must be an integer >= 0, got {self.max_tokens!r}",
        )
        need(
            isinstance(self.min_tokens, int) and self.min_tokens >= 0,
            f"min_tokens must be >= 0, got {self.min_tokens!r}",
        )
        need(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
        )
        need(all(isinstance(s, str) and s for s in self.stop), "stop must be a non-empty string or a list of them")
        # Every generated token is checked against every stop string: bounded, so one request cannot slow
        # every step (OpenAI allows 4 strings; vLLM does not bound them).
        need(
            len(self.stop) <= MAX_STOP_STRINGS,
            f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}",
        )
        need(
            all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
            f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters long",
        )
        need(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be non-negative integers",
        )
        need(
            all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.logit_bias),
            "logit_bias keys must be token ids (integers >= 0)",
        )
        need(
            all(_is_number(b) and -100 <= b <= 100 for b in self.logit_bias.values()),
            "logit_bias values must be numbers in [-100, 100]",
        )
        need(
            not self.embed or (self.max_tokens == 0 and self.n == 1),
            f"embed needs max_tokens == 0 and n == 1 (nothing is generated), got {self.max_tokens!r} and {self.n}",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(
                value is None or (isinstance(value, int) and 0 <= value <= 20),
                f"{name} must be an integer in [0, 20], got {value!r}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_every_position(self) -> bool:
        """Prompt logprobs and embeddings read every prompt position's output: no prefix-cache hits."""
        return self.prompt_logprobs is not None or self.embed

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
