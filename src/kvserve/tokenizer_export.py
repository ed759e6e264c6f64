"""A model's tokenizer, built once by transformers and written out in the form the engine loads.

transformers is the reference for tokenizers: it converts a GGUF file's vocabulary, reads a folder's
tokenizer files and applies each model family's quirks (a rebuilt post-processor, a SentencePiece model turned
into a fast tokenizer). But importing it and holding its tokenizer object costs the serving process ~45 MB (the
memory target of the default model is 700 MB in all), and every operation the engine needs is the
`tokenizers` backend's anyway. So transformers builds the tokenizer once and this module writes out what it
built:

- `tokenizer.json`: the backend tokenizer exactly as transformers configured it (the engine's encode and
  decode are this object's);
- `kvserve_tokenizer.json`: what transformers keeps beside it (`TokenizerSpec`: special tokens, chat
  template, decode clean-up, the settings `/tokenizer_info` shows).

`export_tokenizer` runs in this process when transformers is already imported (the tests, a user's script),
otherwise in a child process (`python -m kvserve.tokenizer_export SOURCE OUT`), so a server never imports it.
tokenizer.py caches the output on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

SPEC_FILE = "kvserve_tokenizer.json"
BACKEND_FILE = "tokenizer.json"


@dataclass
class TokenizerSpec:
    """What a transformers tokenizer holds besides its backend `tokenizers.Tokenizer`."""

    tokenizer_class: str
    vocab_size: int  # len(tokenizer): the vocabulary with added tokens
    bos_token_id: int | None
    eos_token_id: int | None
    special_tokens: dict[str, Any]  # special_tokens_map: {"bos_token": "<s>", ...}; chat templates read it
    chat_template: str | dict[str, str] | None  # a dict holds named templates ("default", "tool_use")
    clean_up_tokenization_spaces: bool  # as transformers applies it (never to BPE, whatever the config says)
    added_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {"content", "special"}
    init_kwargs: dict[str, Any] = field(default_factory=dict)  # the JSON-able settings, for /tokenizer_info
    eos_token_ids: list[int] = field(default_factory=list)  # further ids that end generation (GGUF eot/eom)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenizerSpec:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


def describe(hf: Any, eos_token_ids: list[int] | None = None) -> tuple[str, TokenizerSpec]:
    """The backend tokenizer's JSON and the spec of a transformers tokenizer. ValueError if it has no
    `tokenizers` backend (a slow-only tokenizer transformers could not convert)."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(hf).__name__} has no fast (tokenizers) form; kvserve needs one")
    cleanup = bool(getattr(hf, "clean_up_tokenization_spaces", False))
    if cleanup and type(backend.model).__name__ == "BPE":  # transformers skips it for BPE (see its _decode)
        cleanup = bool(getattr(hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
    init_kwargs = {}
    for key, value in getattr(hf, "init_kwargs", {}).items():
        if key in ("name_or_path", "tokenizer_file", "vocab_file", "merges_file") or key.startswith("_"):
            continue  # local file paths: meaningless to a client
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # AddedToken objects and the like: the spec has their plain form
        init_kwargs[key] = value
    special = {name: _plain(value) for name, value in hf.special_tokens_map.items()}
    spec = TokenizerSpec(
        tokenizer_class=type(hf).__name__,
        vocab_size=len(hf),
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        special_tokens=special,
        chat_template=getattr(hf, "chat_template", None),
        clean_up_tokenization_spaces=cleanup,
        added_tokens={str(i): {"content": t.content, "special": t.special} for i, t in hf.added_tokens_decoder.items()},
        init_kwargs=init_kwargs,
        eos_token_ids=list(eos_token_ids or ()),
    )
    # transformers sets truncation and padding on the backend per call; a tokenizer.json may carry some
    # (a published max_length of 512, say) that would cut every prompt: the engine encodes without either.
    backend_spec = json.loads(backend.to_str())
    backend_spec["truncation"] = backend_spec["padding"] = None
    return json.dumps(backend_spec, ensure_ascii=False), spec


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, str) else str(value)


def write(folder: str, backend_json: str, spec: TokenizerSpec) -> None:
    with open(os.path.join(folder, BACKEND_FILE), "w", encoding="utf-8") as f:
        f.write(backend_json)
    with open(os.path.join(folder, SPEC_FILE), "w", encoding="utf-8") as f:
        json.dump(asdict(spec), f, ensure_ascii=False)


def load_with_transformers(source: str) -> Any:
    """transformers' tokenizer of a .gguf file (its own GGUF conversion: seconds) or a model folder."""
    from transformers import AutoTokenizer

    source = os.path.abspath(source)
    if os.path.isdir(source):
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    folder, name = os.path.split(source)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)


def export_here(source: str, out: str, eos_token_ids: list[int] | None = None) -> None:
    write(out, *describe(load_with_transformers(source), eos_token_ids))


def export_tokenizer(source: str, out: str, eos_token_ids: list[int] | None = None) -> None:
    """Writes the tokenizer of `source` (a .gguf file or a model folder) into the folder `out`: in this process
    if transformers is already imported, else in a child process. ValueError naming the reason if transformers
    cannot build it."""
    if "transformers" in sys.modules:
        try:
            export_here(source, out, eos_token_ids)
        except Exception as exc:
            raise ValueError(f"transformers cannot build the tokenizer of {source}: {exc}") from exc
        return
    command = [sys.executable, "-m", "kvserve.tokenizer_export", source, out, json.dumps(list(eos_token_ids or ()))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise ValueError(f"transformers cannot build the tokenizer of {source}: {reason}")


if __name__ == "__main__":  # the child process of export_tokenizer
    export_here(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
