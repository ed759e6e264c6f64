"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every failure a client can cause maps to a 4xx here; the catch-all handler turns anything else into a
500 of the same shape (a bug, logged with its traceback), so the server never answers with a bare
traceback and never dies of one request.
"""

from __future__ import annotations

import contextlib
import logging
import typing
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("kvserve.server")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    499: "invalid_request_error",  # nginx's "client closed request": the client left before it was read
    503: "server_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        challenge: str = "Bearer",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.challenge = challenge  # a 401's WWW-Authenticate

    def body(self) -> dict:
        info = ErrorInfo(
            message=self.message, type=_TYPES.get(self.status, "server_error"), param=self.param, code=self.code
        )
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": self.challenge} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@contextlib.contextmanager
def param_renamed(old: str, new: str) -> Iterator[None]:
    """An APIError raised inside that names `old` names `new`: the engine's checks speak of the prompt, which
    an endpoint receives as its own field (a chat's messages, an embedding's input)."""
    try:
        yield
    except APIError as exc:
        if exc.param == old:
            exc.param = new
        raise


def from_validation_error(
    exc: ValidationError | RequestValidationError, model: type[BaseModel] | None = None
) -> APIError:
    """The first pydantic error, with the field it concerns as `param` ("max_tokens", "stream_options.include_usage").
    The location is cut at the first part that is not a field (a union member such as "str", a list index)."""
    first = exc.errors()[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    fields: list[str] = []
    current = model
    for part in loc:
        field = current.model_fields.get(part) if current is not None and isinstance(part, str) else None
        if field is None:
            break
        fields.append(part)
        current = _model_in(field.annotation)
    param = ".".join(fields) or (str(loc[0]) if loc else None)
    if first.get("type") == "extra_forbidden":  # a field this server does not implement: refused, never ignored
        name = ".".join(str(part) for part in loc) or param
        return APIError(
            400, f"{name}: this server does not support the field {name!r}", param=name, code="unsupported_parameter"
        )
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{first.get('msg', 'invalid value')}", param=param, code="invalid_value")


def _model_in(annotation) -> type[BaseModel] | None:
    """The BaseModel in `Model` or `Model | None`, if any."""
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def from_value_error(exc: ValueError, known_params: set[str]) -> APIError:
    """A ValueError from SamplingParams or the engine; its messages start with the field they concern."""
    message = str(exc)
    first = message.split(" ", 1)[0].strip(":,()")
    param = first if first.split(".")[0] in known_params else None  # "structured_outputs.json" too
    if "maximum context length" in message:
        param, code = "prompt", "context_length_exceeded"
    else:
        code = "invalid_value"
    return APIError(400, message, param=param, code=code)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        logger.info("%d on %s %s: %s", exc.status, request.method, request.url.path, exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        response = APIError(exc.status_code, str(exc.detail), code=code).response()
        response.headers.update(exc.headers or {})  # a 405's Allow: the methods the path has (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", code="internal_error").response()
