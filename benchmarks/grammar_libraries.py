"""xgrammar against llguidance on the default model's tokenizer, for issue 16's choice of a grammar
library: import time, tokenizer set-up, grammar compile (a nested JSON schema, any JSON object, a
regex), and per token, filling the vocabulary bitmask and advancing the matcher along a valid answer.

Neither is a kvserve dependency yet; install them beside it without their dependencies (xgrammar's
pull in triton, 286 MB) and run each in its own process:

    pip download --no-deps -d /tmp/wheels xgrammar apache-tvm-ffi llguidance
    pip install --no-deps --target /tmp/xg /tmp/wheels/xgrammar-*.whl /tmp/wheels/apache_tvm_ffi-*.whl
    pip install --no-deps --target /tmp/llg /tmp/wheels/llguidance-*.whl
    PYTHONPATH=/tmp/xg python benchmarks/grammar_libraries.py xgrammar
    PYTHONPATH=/tmp/llg python benchmarks/grammar_libraries.py llguidance

llguidance's own torch helpers (llguidance.torch) decorate a function with torch.compile at import
(4.5 s and +150 MiB measured), so its mask is filled here through LLMatcher.unsafe_compute_mask_ptr
into a torch int32 tensor instead.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from kvserve.models.paths import resolve_model_path
from kvserve.tokenizer import Tokenizer

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "tags": ["a", "c"], "address": {"city": "London", "zip": "12345"}}
REGEX = r"[0-9]{3}-[0-9]{3}-[0-9]{4}"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def allowed(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask[0, token // 32]) >> (token % 32)) & 1)


def run_xgrammar(hf, ids: list[int], out: dict) -> None:
    xgr, out["import_s"] = timed(lambda: __import__("xgrammar"))
    info, out["tokenizer_s"] = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    grammar, out["compile_schema_s"] = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
    _, out["compile_json_s"] = timed(compiler.compile_builtin_json_grammar)
    _, out["compile_regex_s"] = timed(lambda: compiler.compile_regex(REGEX))
    matcher = xgr.GrammarMatcher(grammar)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    start = time.perf_counter()
    for token in ids:
        matcher.fill_next_token_bitmask(mask)
        assert allowed(mask, token) and matcher.accept_token(token), token
    out["per_token_ms"] = (time.perf_counter() - start) / len(ids) * 1e3


def run_llguidance(hf, ids: list[int], out: dict) -> None:
    llguidance, out["import_s"] = timed(lambda: __import__("llguidance.hf").hf and __import__("llguidance"))
    from llguidance import LLMatcher
    from llguidance.hf import from_tokenizer

    lltok, out["tokenizer_s"] = timed(lambda: from_tokenizer(hf, n_vocab=VOCAB))

    def matcher(grammar: str) -> LLMatcher:
        m = LLMatcher(lltok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    schema = json.dumps(SCHEMA)
    m, out["compile_schema_s"] = timed(lambda: matcher(LLMatcher.grammar_from_json_schema(schema)))
    _, out["compile_json_s"] = timed(lambda: matcher(LLMatcher.grammar_from_json_schema('{"type": "object"}')))
    _, out["compile_regex_s"] = timed(lambda: matcher(LLMatcher.grammar_from_regex(REGEX)))
    mask = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    start = time.perf_counter()
    for token in ids:
        m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        assert allowed(mask, token) and m.consume_token(token), (token, m.get_error())
    out["per_token_ms"] = (time.perf_counter() - start) / len(ids) * 1e3


def main() -> None:
    lib = sys.argv[1] if len(sys.argv) > 1 else ""
    if lib not in ("xgrammar", "llguidance"):
        raise SystemExit("usage: grammar_libraries.py xgrammar|llguidance")
    tokenizer = Tokenizer.load(resolve_model_path(None))
    ids = tokenizer.encode(json.dumps(ANSWER), False)
    out: dict = {"lib": lib, "answer_tokens": len(ids)}
    before = rss_mib()
    (run_xgrammar if lib == "xgrammar" else run_llguidance)(tokenizer.hf, ids, out)
    out["rss_added_mib"] = rss_mib() - before
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
