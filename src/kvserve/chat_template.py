"""Chat templates rendered as transformers renders them (apply_chat_template with tokenize=False), without
importing transformers.

A chat template is Jinja from the model's publisher, written against transformers' environment: a sandbox
that cannot change the objects it is given, trim_blocks and lstrip_blocks, the loop controls, a `tojson` that
does not escape HTML and takes indent/separators, `raise_exception`, `strftime_now`, a guarded `namespace`, the
`{% generation %}` tag (which renders its body), and as variables the messages, `tools`, `documents`,
`add_generation_prompt`, the tokenizer's special tokens and any caller keywords. Before rendering,
transformers drops message keys whose value is None and copies a message's reasoning under its three names
(`reasoning_content`, `thinking`, `reasoning`). tests/test_tokenizer.py checks the output byte for byte against
transformers'."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

# A message's reasoning goes by these names; templates read the first (gpt-oss ones read "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to the message that continue_final_message leaves open; the text is cut where it lands.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def select_template(template: str | dict[str, str] | None, tools: Any = None) -> str:
    """The template to render: a dict of named templates gives "tool_use" when there are tools and it has one,
    else "default". ValueError when there is none."""
    if isinstance(template, dict):
        if tools is not None and "tool_use" in template:
            return template["tool_use"]
        if "default" in template:
            return template["default"]
        raise ValueError(f"this model has several chat templates and no default: {sorted(template)}")
    if not template:
        raise ValueError("this model's tokenizer has no chat template: send a plain prompt instead")
    return template


@lru_cache(maxsize=16)
def compile_template(text: str) -> Any:
    """The compiled template (cached: a server renders the same one for every request). Raises jinja2's
    TemplateSyntaxError."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks: rendering
        only emits its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class GuardedNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names, which could reach the interpreter's internals."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                GuardedNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            GuardedNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")

    class DictMaker:
        """`dict(...)` and `dict.fromkeys(...)` for templates, without the type itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = DictMaker()
    env.globals["namespace"] = GuardedNamespace
    return env.from_string(text)


def _plain(value: Any) -> Any:
    """Only JSON types reach the template (as transformers ensures): anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _with_reasoning_aliases(message: dict) -> dict:
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render(
    template: str,
    messages: list[dict],
    special_tokens: dict[str, Any],
    add_generation_prompt: bool,
    continue_final_message: bool,
    **kwargs: Any,
) -> str:
    """The template applied to `messages`. kwargs reach the template as variables (tools, documents, and
    chat_template_kwargs); they override special tokens of the same name. Raises jinja2's TemplateError for
    what the template rejects, ValueError when continue_final_message cannot be honoured."""
    tools = _plain(kwargs.pop("tools", None))
    documents = _plain(kwargs.pop("documents", None))
    variables = _plain({**special_tokens, **kwargs})
    chat = [_with_reasoning_aliases(_plain({k: v for k, v in m.items() if v is not None})) for m in messages]
    final = ""
    if continue_final_message:
        final = chat[-1].get("content")
        if final is None:
            raise ValueError('continue_final_message: the final message has no "content" to continue')
        if "content" not in template:
            raise ValueError('continue_final_message: this chat template does not read "content"')
        if isinstance(final, str):
            chat[-1]["content"] = final + _CONTINUE_TAG
    text = compile_template(template).render(
        messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **variables
    )
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ValueError("continue_final_message: the chat template dropped part of the final message")
        at = text.rindex(tag)
        # A template that keeps spacing leaves the tag whole; one that trims it needs the final rstrip.
        text = text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text
