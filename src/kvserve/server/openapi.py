"""GET /openapi.json: the server's OpenAPI schema, with every request body declared as the pydantic
model that validates it, so that the schema states each field and its bounds (what API fuzzers such as
schemathesis generate from) and cannot drift from what the server accepts.

The POST routes read their bodies themselves (serving.parse_body: invalid JSON and unknown fields get
this server's own 400s), so FastAPI does not see their models: each route declares its model with
`json_body(Model)` and its error answers with ERROR_RESPONSES, and the models' JSON schemas (validation
mode: aliases such as `schema`, and the bounds) become the schema's components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from kvserve.server.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's openapi_extra: its request body is `model`, as JSON."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


# What every endpoint may answer besides its result (errors.py): the error body of the OpenAI API.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    for status, description in (
        (400, "invalid request (the error's param names the field)"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (503, "queue full or engine unavailable"),
    )
}


# A generating endpoint answers JSON, or an event stream when the request asks for one.
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the result, or its events with stream: true",
        "content": {"application/json": {}, "text/event-stream": {}},
    },
    **ERROR_RESPONSES,
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
    "additionalProperties": False,
}
_TOOL_CALL = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {
                "name": {"type": "string"},
                "arguments": {"anyOf": [{"type": "string"}, {"type": "object"}]},  # JSON text, or the object
            },
        },
    },
}
# An OpenAI chat message as the chat template takes it (tokenizer._normalize_messages checks it).
CHAT_MESSAGE = {
    "type": "object",
    "required": ["role"],  # content may be left out by an assistant turn that calls tools
    "properties": {
        "role": {"type": "string", "minLength": 1},  # system, user, assistant, tool, or the template's own
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]},
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": _TOOL_CALL},
        "tool_call_id": {"type": "string"},
    },
}

# Request fields that carry token ids (a prompt given as ids, /detokenize's tokens).
_TOKEN_FIELDS = ("prompt", "input", "tokens")


def _bound_integers(node: Any, maximum: int) -> None:
    """Every integer schema under node gets the bounds of a token id: [0, maximum]."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["minimum"], node["maximum"] = 0, maximum
        for value in node.values():
            _bound_integers(value, maximum)
    elif isinstance(node, list):
        for value in node:
            _bound_integers(value, maximum)


def build_openapi(
    app: FastAPI,
    body_models: list[type[BaseModel]],
    secured: bool,
    fixed: dict[str, dict[str, Any]],
    vocab_size: int,
) -> dict[str, Any]:
    """The schema of `app`'s routes, with body_models (and the error body) as components. What the models
    leave open but the server decides is stated too: `fixed` replaces the schema of fields by name (the
    served model names, the one embedding size), token ids are in [0, vocab_size), and a chat message
    has the shape the chat template takes (the models hold messages as plain objects, checked when
    rendered). `secured` declares the bearer API key."""
    schema = get_openapi(title="kvserve", version="0.1.0", routes=app.routes, description=__doc__.split("\n\n")[0])
    models = [(m, "validation") for m in body_models] + [(ErrorResponse, "serialization")]
    _, definitions = models_json_schema(models, ref_template=_REF)
    components = definitions.get("$defs", {})
    for model in body_models:
        properties = components[model.__name__]["properties"]
        for name, replacement in fixed.items():
            if name in properties:
                properties[name] = replacement
        for name in _TOKEN_FIELDS:
            if name in properties:
                _bound_integers(properties[name], vocab_size - 1)
        if "messages" in properties:
            properties["messages"]["items"] = CHAT_MESSAGE
    schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
    if secured:
        schema["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"apiKey": []}]
    return schema
