"""Tokenizer, chat template and incremental detokenization.

transformers is the reference for tokenizing and chat templates: models are published against it, so our token
ids and prompts must be the ones it gives. But the serving process does not import it (it and its tokenizer
object cost ~45 MB of the default model's 700 MB memory target): transformers builds each model's tokenizer
once, in a child process, and writes out its `tokenizers` backend and settings (tokenizer_export.py); that
output is cached on disk (`_TokenizerCache`), and the engine encodes and decodes with the `tokenizers` backend
and renders chat templates the way transformers does (chat_template.py). Tests check both against
transformers.

`IncrementalDetokenizer` turns the token ids a sequence generates into text deltas for streaming: it never emits
half a UTF-8 character, keeps the spacing that only the tokens' context decides, and cuts the text at stop strings
without ever emitting text that later turns out to belong to one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from kvserve.chat_template import render, select_template
from kvserve.models.gguf_metadata import read_gguf_metadata
from kvserve.tokenizer_export import BACKEND_FILE, SPEC_FILE, TokenizerSpec, describe, export_tokenizer

logger = logging.getLogger(__name__)

# Files any of which makes a folder a tokenizer folder for transformers (fast tokenizer, its config, a
# SentencePiece model, a GPT-2 style vocabulary). A folder with none of them has no tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Every file of a folder that can change the tokenizer transformers builds: the cache key covers them all.
_KEY_FILES = _TOKENIZER_FILES + (
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
)

# Bumped when what the cache stores changes, so old entries are ignored rather than misread.
_CACHE_FORMAT = 2

REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for an incomplete UTF-8 sequence


# ---------------------------------------------------------------- GGUF metadata


@dataclass(frozen=True)
class GGUFTokenizerInfo:
    """The scalar tokenizer fields of a GGUF file: enough to know whether it has a tokenizer at all and which
    ids end generation (transformers keeps one eos token; llama.cpp also stops on eot/eom)."""

    model: str | None  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    num_tokens: int  # length of tokenizer.ggml.tokens; 0 when the file has no vocabulary
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool

    @property
    def has_tokenizer(self) -> bool:
        return self.model is not None and self.num_tokens > 0


def read_gguf_tokenizer_info(path: str) -> GGUFTokenizerInfo:
    meta = read_gguf_metadata(path)
    eos = [
        meta.get(f"tokenizer.ggml.{name}_token_id")
        for name in ("eos", "eot", "eom")  # llama.cpp ends generation on any of them (its "end of generation")
    ]
    return GGUFTokenizerInfo(
        model=meta.get("tokenizer.ggml.model"),
        num_tokens=int(meta.get("tokenizer.ggml.tokens", 0) or 0),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(sorted({int(i) for i in eos if i is not None})),
        has_chat_template=bool(meta.get("tokenizer.chat_template")),
    )


# ---------------------------------------------------------------- on-disk cache of exported tokenizers


def default_cache_dir() -> str:
    """$KVSERVE_TOKENIZER_CACHE, else $XDG_CACHE_HOME/kvserve/tokenizers, else ~/.cache/kvserve/tokenizers."""
    explicit = os.environ.get("KVSERVE_TOKENIZER_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvserve", "tokenizers")


def _cache_disabled() -> bool:
    return os.environ.get("KVSERVE_TOKENIZER_CACHE", "").lower() in ("0", "off", "false", "no")


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


def _source_stamp(path: str) -> str:
    """What identifies the tokenizer a source gives: a .gguf file's size and mtime, or those of each of a
    folder's tokenizer files (so a replaced or edited file is a different entry)."""
    if not os.path.isdir(path):
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    parts = []
    for name in _KEY_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            st = os.stat(file)
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return ",".join(parts)


@dataclass
class _TokenizerCache:
    """Exported tokenizers (tokenizer_export.py: ~0.2 s to load against seconds for transformers to build one,
    in a child process). An entry is keyed by the source's real path and its files' sizes and mtimes, and by the
    transformers/tokenizers versions (so a converter fix is picked up). Entries are written to a temporary folder
    and renamed into place: a reader sees a whole entry or none, and of two processes exporting at once one
    simply wins the rename. Storing an entry deletes those whose source is gone (models in temporary folders)."""

    root: str

    def entry(self, source: str) -> str:
        real = os.path.realpath(source)
        versions = f"{_package_version('transformers')}\0{_package_version('tokenizers')}"
        key = f"{real}\0{_source_stamp(real)}\0{versions}\0{_CACHE_FORMAT}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        stem = os.path.basename(real.rstrip(os.sep)).removesuffix(".gguf")[:48]
        return os.path.join(self.root, f"{stem}-{digest}")

    def load(self, source: str) -> tuple[Any, TokenizerSpec] | None:
        folder = self.entry(source)
        if not os.path.isfile(os.path.join(folder, SPEC_FILE)):
            return None
        try:
            return _read_export(folder)
        except Exception as exc:  # noqa: BLE001 - a bad entry only costs a fresh export
            logger.warning("ignoring unreadable tokenizer cache entry %s: %s", folder, exc)
            return None

    def store(self, source: str, exported: str) -> None:
        """Moves the export folder `exported` (written inside the cache's root: see _scratch_dir) into the cache
        as `source`'s entry; then deletes the entries whose source is gone."""
        folder = self.entry(source)
        try:
            with open(os.path.join(exported, SPEC_FILE + ".source"), "w") as f:
                f.write(os.path.realpath(source))
            os.rename(exported, folder)  # atomic; fails if another process already stored this entry: fine
        except OSError as exc:  # read-only home, full disk...: caching is an optimisation, never an error
            if not os.path.isdir(folder):
                logger.warning("could not cache the tokenizer in %s: %s", self.root, exc)
            return
        self._prune()

    def _prune(self) -> None:
        for name in os.listdir(self.root):
            marker = os.path.join(self.root, name, SPEC_FILE + ".source")
            try:
                with open(marker) as f:
                    source = f.read()
            except OSError:
                continue  # an entry being written, or an older format: left alone
            if source and not os.path.exists(source):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def _read_export(folder: str) -> tuple[Any, TokenizerSpec]:
    from tokenizers import Tokenizer as Backend

    with open(os.path.join(folder, SPEC_FILE), encoding="utf-8") as f:
        spec = TokenizerSpec.from_json(json.load(f))
    return Backend.from_file(os.path.join(folder, BACKEND_FILE)), spec


def _generation_config_eos(folder: str) -> set[int]:
    """eos ids from generation_config.json: chat models often stop on several (e.g. Llama 3's <|eot_id|>)."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return set()
    if eos is None:
        return set()
    return {int(i) for i in (eos if isinstance(eos, list) else [eos])}


# ---------------------------------------------------------------- the tokenizer

# What transformers' decode does to the text when a (WordPiece-style) tokenizer asks for clean-up.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


class Tokenizer:
    """A model's tokenizer: the `tokenizers` backend transformers built, and the settings it keeps beside it.

    Attributes: `eos_token_ids` (every id that ends generation), `bos_token_id`, `vocab_size` (the vocabulary
    with added tokens; the model's embedding may be larger), `has_chat_template`, `spec` (the TokenizerSpec),
    `backend` (the tokenizers.Tokenizer)."""

    def __init__(self, backend: Any, spec: TokenizerSpec, extra_eos_token_ids: set[int] | None = None, name: str = ""):
        self.backend = backend
        self.spec = spec
        self.name = name
        eos = set(extra_eos_token_ids or ()) | set(spec.eos_token_ids)
        if spec.eos_token_id is not None:
            eos.add(int(spec.eos_token_id))
        self.eos_token_ids: set[int] = eos
        self.bos_token_id: int | None = None if spec.bos_token_id is None else int(spec.bos_token_id)
        self.vocab_size: int = spec.vocab_size
        self._pieces: dict[int, str] = {}  # id_to_piece is called for every logprob entry: memoize
        self._transformers: Any = None

    # ---- loading

    @classmethod
    def load(cls, model_path: str, *, cache_dir: str | None = None, use_cache: bool = True) -> Tokenizer | None:
        """The tokenizer of a model: a .gguf file (from its metadata) or a Hugging Face folder (from its tokenizer
        files). None when the model has no tokenizer (a folder without tokenizer files, a GGUF file without a
        vocabulary): the engine then works on token ids only. Never touches the network."""
        model_path = os.fspath(model_path)
        if os.path.isdir(model_path):
            if not any(os.path.isfile(os.path.join(model_path, f)) for f in _TOKENIZER_FILES):
                return None
            backend, spec = _exported(model_path, [], cache_dir, use_cache)
            return cls(backend, spec, _generation_config_eos(model_path), name=model_path)
        if os.path.isfile(model_path):
            with open(model_path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ValueError(f"{model_path!r} is neither a .gguf file nor a Hugging Face model folder")
            info = read_gguf_tokenizer_info(model_path)
            if not info.has_tokenizer:
                return None  # e.g. the tiny GGUF models the tests write: weights only
            backend, spec = _exported(model_path, list(info.eos_token_ids), cache_dir, use_cache)
            return cls(backend, spec, name=model_path)
        raise FileNotFoundError(f"no model at {model_path!r}")

    @classmethod
    def from_transformers(cls, hf: Any, extra_eos_token_ids: set[int] | None = None, name: str = "") -> Tokenizer:
        """The tokenizer of a transformers tokenizer object (one built in a script or a test)."""
        from tokenizers import Tokenizer as Backend

        backend_json, spec = describe(hf)
        return cls(Backend.from_str(backend_json), spec, extra_eos_token_ids, name=name)

    def transformers_tokenizer(self) -> Any:
        """This tokenizer as a transformers PreTrainedTokenizerFast, for libraries that take one (xgrammar).
        Imports transformers: only the features that need it call this."""
        if self._transformers is None:
            from transformers import PreTrainedTokenizerFast

            special = {k: v for k, v in self.spec.special_tokens.items() if isinstance(v, str)}
            self._transformers = PreTrainedTokenizerFast(tokenizer_object=self.backend, **special)
            self._transformers.chat_template = self.spec.chat_template
        return self._transformers

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={sorted(self.eos_token_ids)})"

    # ---- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds what the model's post-processor adds (a BOS for Llama-style
        tokenizers, nothing for SmolLM2). Special-token text in `text` ("<|im_end|>") maps to the special id."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        if self.spec.clean_up_tokenization_spaces:
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text

    def id_to_piece(self, token_id: int) -> str:
        """The decoded text of one token, special tokens included ("<|im_end|>", " world"), as OpenAI logprob dicts
        show tokens. A token holding part of a multi-byte character decodes to U+FFFD, as in OpenAI's output."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.decode([token_id], skip_special_tokens=False)
        return piece

    convert_ids_to_tokens = id_to_piece

    # ---- chat

    def set_chat_template(self, template: str) -> None:
        """Replaces the tokenizer's chat template: `template` is a file's path or the Jinja text itself (what
        vLLM's --chat-template takes). ValueError for a path that does not exist or a template that does
        not parse, so a typo fails at start-up rather than on the first chat."""
        text = template
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                text = f.read()
        elif "{" not in template:  # no Jinja in it: meant as a path
            raise ValueError(f"chat_template: no such file: {template!r}")
        from jinja2 import TemplateSyntaxError

        from kvserve.chat_template import compile_template

        try:
            compile_template(text)
        except TemplateSyntaxError as exc:
            raise ValueError(f"chat_template does not parse: {exc}") from None
        self.spec.chat_template = text
        self._transformers = None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.spec.chat_template)

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """The chat template applied to `messages` (OpenAI-style dicts with "role" and "content"), as text.
        continue_final_message leaves the last message open (no end-of-turn after it), so that generation
        continues it (a prefilled assistant answer); it excludes add_generation_prompt. template_kwargs
        are passed to the template (e.g. tools=...). ValueError for a model without a chat template,
        malformed or empty messages, or messages the template itself rejects."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        template = select_template(self.spec.chat_template, template_kwargs.get("tools"))
        normalized = _normalize_messages(messages)
        from jinja2 import TemplateError

        try:
            return render(
                template,
                normalized,
                self.spec.special_tokens,
                add_generation_prompt,
                continue_final_message,
                **template_kwargs,
            )
        except TemplateError as exc:  # templates reject e.g. a bad role order with raise_exception(...)
            raise ValueError(f"the chat template rejected these messages: {exc}") from exc

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat. Special tokens are not added again: the template already wrote them
        (this is what transformers' apply_chat_template(tokenize=True) does too)."""
        text = self.render_chat(messages, add_generation_prompt, continue_final_message, **template_kwargs)
        return self.encode(text, False)


def _exported(
    source: str, eos_token_ids: list[int], cache_dir: str | None, use_cache: bool
) -> tuple[Any, TokenizerSpec]:
    """The exported tokenizer of `source`: from the cache, else exported by transformers (and cached)."""
    cache = _TokenizerCache(cache_dir or default_cache_dir()) if use_cache and not _cache_disabled() else None
    if cache is not None:
        hit = cache.load(source)
        if hit is not None:
            return hit
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=_scratch_dir(cache))
    try:
        export_tokenizer(source, tmp, eos_token_ids)
        loaded = _read_export(tmp)
        if cache is not None:
            cache.store(source, tmp)
        return loaded
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _scratch_dir(cache: _TokenizerCache | None) -> str | None:
    """Where an export is written: inside the cache (so storing it is a rename), else the system's temp folder."""
    if cache is None:
        return None
    try:
        os.makedirs(cache.root, exist_ok=True)
        return cache.root
    except OSError:
        return None


# Arguments of render_chat that are request fields of their own, so never chat_template_kwargs.
_RESERVED_TEMPLATE_KWARGS = ("add_generation_prompt", "continue_final_message", "tokenize", "conversation")


def chat_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A request's chat_template_kwargs, checked: ValueError if it sets one of render_chat's own arguments."""
    kwargs = dict(kwargs or {})
    clash = [name for name in _RESERVED_TEMPLATE_KWARGS if name in kwargs]
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {clash}: give them as fields of their own")
    return kwargs


def _normalize_messages(messages: Any) -> list[dict]:
    """Checks OpenAI-style chat messages and flattens list-of-parts content into the plain string text-only chat
    templates expect (they concatenate message['content'] directly)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is a {type(message).__name__}, not a dict with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} has no 'role' string")
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            texts = []
            for part in content:
                is_text = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                if not is_text or len(part) != 2:  # nothing beside type and text: no field is ignored
                    raise ValueError(f"message {i}: only text content parts ({{'type': 'text', 'text': ...}}) work")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            if not message.get("tool_calls"):  # an assistant turn that only calls tools may have no content
                raise ValueError(f"message {i} ({role}) has no 'content'")
        elif not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string or a list of text parts")
        for key in ("name", "tool_call_id"):
            if key in message and not isinstance(message[key], str):
                raise ValueError(f"message {i}: '{key}' must be a string")
        calls = message.get("tool_calls", [])
        if not isinstance(calls, list) or not all(_is_tool_call(call) for call in calls):
            raise ValueError(f"message {i}: 'tool_calls' must be a list of {{'function': {{'name', 'arguments'}}}}")
        out.append({**message, "content": content})
    return out


def _is_tool_call(call: Any) -> bool:
    """An earlier assistant turn's call: {"function": {"name": str, "arguments": JSON text or an object}},
    with an optional "id" (a string) and "type" ("function")."""
    function = call.get("function") if isinstance(call, dict) else None
    return (
        isinstance(function, dict)
        and call.get("type", "function") == "function"
        and isinstance(call.get("id", ""), str)
        and isinstance(function.get("name"), str)
        and isinstance(function.get("arguments"), (str, dict))
    )


# ---------------------------------------------------------------- incremental detokenization

# How many prompt tokens give the first generated tokens their context (vLLM uses 5 too): enough for decoders
# whose output for a token depends on its neighbours (a SentencePiece "▁world" after "Hello" is " world", alone it is
# "world"), while decoding stays O(window) per token.
_PROMPT_CONTEXT_TOKENS = 5


def find_stop(text: str, stops: list[str], start: int = 0) -> tuple[int, int, str] | None:
    """The first stop string in text[start:], as (begin, end, stop). "First" means the one that ends first (ties:
    the longer one), i.e. the one a token-by-token stream completes first, whatever the tokenization."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        begin = text.find(stop, start)
        if begin < 0:
            continue
        end = begin + len(stop)
        if best is None or end < best[1] or (end == best[1] and begin < best[0]):
            best = (begin, end, stop)
    return best


def _stop_prefix_len(text: str, stops: list[str], start: int) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of a stop string: text that may yet
    turn out to be the start of a stop string, so it must not be emitted yet."""
    longest = min(max(len(s) for s in stops) - 1, len(text) - start)
    for length in range(longest, 0, -1):
        tail = text[len(text) - length :]
        if any(s.startswith(tail) for s in stops):
            return length
    return 0


@dataclass(eq=False)
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    UTF-8: byte-level tokens can end in the middle of a character, which decodes to U+FFFD; such text is held
    until the character completes. Context: decoding tokens one by one can differ from decoding them together
    (leading spaces, byte fallback), so - as vLLM does - each step decodes a short window [prefix_offset:] of the
    ids and emits what it adds to the text of [prefix_offset:read_offset]; the window starts with the last prompt
    tokens. Stop strings: found across token boundaries; the longest tail that could still grow into a stop string is
    held back, so text later found to be part of a stop string is never emitted; flush() releases it.

    The deltas plus flush() equal tokenizer.decode(output ids), cut at the first stop string (see find_stop):
    exactly so for byte-level BPE; for decoders that drop the leading space of a text, the first token keeps the
    space its prompt context gives it (as in vLLM and in decode(prompt + output) minus decode(prompt)).
    `min_tokens`: stop strings are ignored until that many tokens were added (SamplingParams.min_tokens)."""

    tokenizer: Tokenizer = field(repr=False)
    prompt_token_ids: list[int] = field(repr=False)
    skip_special_tokens: bool = True
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False
    min_tokens: int = 0

    text: str = field(default="", init=False)  # all text emitted so far
    stopped: bool = field(default=False, init=False)  # a stop string was found; nothing more is emitted
    stop_string: str | None = field(default=None, init=False)  # the stop string found
    num_tokens: int = field(default=0, init=False)  # output tokens added so far

    def __post_init__(self) -> None:
        self._stops = [s for s in (self.stop or []) if s]  # an empty stop string would stop at once: ignore it
        # The window: ids from prefix_offset on; _read is read_offset - prefix_offset.
        context = list(self.prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character, which the output completes: that character belongs to neither
            # text. Decoding the output on its own keeps the emitted text equal to decode(output ids).
            context = []
        self._window: list[int] = context
        self._read = len(context)
        self._decoded = ""  # output text decoded so far (complete characters); self.text is a prefix of it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _advance(self, final: bool) -> None:
        """Decodes the window; commits its new text unless it ends mid-character (or adds nothing yet, e.g. a
        skipped special token), in which case the tokens wait in the window for the next call."""
        if self._read == len(self._window):
            return
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        if final or (len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR)):
            self._decoded += new_text[len(prefix_text) :]
            # The tokens just read become the next window's context.
            self._window = self._window[self._read :]
            self._read = len(self._window)

    def _emit(self, final: bool) -> str:
        if self.stopped:
            return ""
        start = len(self.text)
        end = len(self._decoded)
        if self._stops and self.num_tokens >= self.min_tokens:
            # A stop string cannot begin in text already emitted: text that could have begun one was held back.
            hit = find_stop(self._decoded, self._stops, start)
            if hit is not None:
                begin, stop_end, stop = hit
                end = stop_end if self.include_stop_str_in_output else begin
                self.stopped, self.stop_string = True, stop
            elif not final:
                end -= _stop_prefix_len(self._decoded, self._stops, start)
        delta = self._decoded[start:end]
        self.text += delta
        return delta

    def add_token(self, token_id: int) -> str:
        """Adds one generated token; returns the text that is safe to emit now (often "")."""
        if self.stopped:
            return ""
        self.num_tokens += 1
        self._window.append(int(token_id))
        self._advance(final=False)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of generation: emits the text still held (an incomplete character decodes as U+FFFD; a
        partial stop string is just text), still cut at a stop string if the held text completes one."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._emit(final=True)
