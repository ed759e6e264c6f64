"""Structured outputs: constraining a request's tokens to a JSON schema, any JSON object, a regex, a
choice of strings or an EBNF grammar, with xgrammar (the library vLLM and SGLang use).

Why xgrammar (measured against llguidance, benchmarks/README.md "Grammar libraries"): on this
project's CPUs the per-token cost is what a serving step pays, 32 times at batch 32, and xgrammar's
mask + advance is 0.03-0.05 ms a token against llguidance's 0.13-0.35 ms; its compile is slower
(11-14 ms for a nested schema against 3-5 ms) but happens once per schema, cached, off the step
loop. Its cost is the install (it pulls triton on Linux, ~290 MB on disk); it is imported only when
the first constrained request arrives, so a server that never sees one pays no memory for it.

The life of a constraint:
- `GrammarCache.compile(spec)` turns a `StructuredOutputsParams` into a compiled grammar, once per
  (kind, spec); the failure of a bad schema is cached too, as its ValueError. It runs on any thread
  (the server calls it from a worker thread before handing the request to the engine, so the step
  loop never waits on a compile); a lock makes concurrent compiles of one spec share the work.
- Each sequence (each of the n samples) holds its own `GrammarMatcher`, created with the request.
  Every step, the engine fills one row of a token bitmask per constrained row, the sampler sets the
  disallowed logits to -inf before anything else, and the sampled token advances the matcher.
- The matcher lives on the Request, so preemption (which recomputes the KV of tokens already
  generated, not the tokens) leaves it as it is; prefix-cache hits change no tokens either.
- A matcher that accepted an end-of-sequence token is terminated: the sequence finishes with `stop`.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from kvserve.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from kvserve.tokenizer import Tokenizer

CACHE_LIMIT = 512  # compiled grammars kept (a schema's is ~tens of kB); the oldest goes first
# Whitespace characters allowed in one run between JSON tokens. Unbounded, a small model sampled at
# temperature 1 can spend its whole budget on newlines inside an object (seen with the default model);
# 32 still admits pretty-printing seven levels deep at four spaces.
MAX_WHITESPACE_RUN = 32
ANY_OBJECT = '{"type": "object"}'


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly the given strings. JSON's string escapes are the
    grammar's string escapes, so json.dumps quotes any text safely."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCache:
    """Compiled grammars for one tokenizer, built on first use and kept (LRU, CACHE_LIMIT entries)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width: may exceed the tokenizer's vocabulary
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()  # guards _entries and the counters
        self._init_lock = threading.Lock()
        # (kind, spec) -> Future of the CompiledGrammar, or of the ValueError a bad spec gives
        self._entries: dict[tuple[str, str], Future] = {}
        self.hits = 0
        self.misses = 0

    def _xgrammar_compiler(self) -> Any:
        with self._init_lock:  # the first constrained request builds it (~0.3 s for a 49k vocabulary)
            if self._compiler is None:
                self._compiler = self._build_compiler()
            return self._compiler

    def _build_compiler(self) -> Any:
        if not self.stop_token_ids:  # a grammar ends by allowing only them
            raise ValueError("structured_outputs need the model's end-of-sequence token; this model declares none")
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(
            self.tokenizer.transformers_tokenizer(), vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
        )
        # One thread: the engine's compute threads own the cores; a compile is milliseconds.
        return xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar for spec; raises ValueError naming the problem if it does not compile.
        Concurrent calls for one spec share one compile (the later ones wait on its future); calls for
        other specs never wait on it: the lock guards only the table."""
        key = spec.key()
        with self._lock:
            future = self._entries.pop(key, None)
            owner = future is None
            if owner:
                self.misses += 1
                future = Future()
            else:
                self.hits += 1
            self._entries[key] = future  # most recent last
            while len(self._entries) > CACHE_LIMIT:
                del self._entries[next(iter(self._entries))]
        if owner:
            try:
                future.set_result(self._compile(spec))
            except BaseException as exc:  # not a bad spec (those come back as ValueError): forget it
                future.set_exception(exc)
                with self._lock:
                    if self._entries.get(key) is future:
                        del self._entries[key]
                raise
        result = future.result()
        if isinstance(result, ValueError):
            raise ValueError(str(result))
        return result

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        compiler = self._xgrammar_compiler()
        kind, text = spec.kind, spec.key()[1]
        try:
            whitespace = dict(any_whitespace=not spec.disable_any_whitespace, max_whitespace_cnt=MAX_WHITESPACE_RUN)
            if kind == "json":  # strict, as vLLM: properties a schema does not list are not allowed
                return compiler.compile_json_schema(text, **whitespace)
            if kind == "json_object":  # OpenAI's json_object: an object, any members
                return compiler.compile_json_schema(ANY_OBJECT, strict_mode=False, **whitespace)
            if kind == "regex":
                return compiler.compile_regex(text)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports bad specs as RuntimeError
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return ValueError(f"structured_outputs: the {kind} cannot be compiled: {message}")

    def matcher(self, compiled: Any) -> Any:
        import xgrammar

        return xgrammar.GrammarMatcher(compiled)


def fill_bitmask(matchers: dict[int, Any], batch: int, vocab_size: int) -> torch.Tensor:
    """[batch, ceil(V / 32)] int32, all tokens allowed, then row i filled from matchers[i]: bit j of
    word w set when token 32w + j may come next."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(batch, vocab_size)
    for row, matcher in matchers.items():
        matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask
