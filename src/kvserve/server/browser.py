"""What a browser gets: the KV dashboard's page, and the API key accepted as Basic auth's password.

Shared by the server and the router (torch-free: the router imports no engine). With --api-key, the
dashboard's routes want the key as the API does ("Authorization: Bearer KEY"), or as the password of
HTTP Basic auth, which a browser asks for itself (a 401 with WWW-Authenticate: Basic) and then sends
with the page's own requests (its EventSource): the key never appears in a URL.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from importlib.resources import files

from fastapi import Request

from kvserve.server.errors import APIError


def dashboard_html(router: bool = False) -> str:
    """The page (server/dashboard.html); behind the router it offers a choice of worker."""
    html = files("kvserve.server").joinpath("dashboard.html").read_text(encoding="utf-8")
    return html.replace("<body>", '<body data-router="true">', 1) if router else html


def browser_authorizer(api_key: str | None):
    """A dependency: no key configured, or Bearer KEY, or Basic with KEY as the password; else 401 asking
    the browser for credentials."""
    expected = api_key.encode() if api_key else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        secret = b""
        if scheme.lower() == "bearer":
            secret = value.encode()
        elif scheme.lower() == "basic":
            try:
                secret = base64.b64decode(value, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                secret = b""
        if not hmac.compare_digest(secret, expected):
            raise APIError(
                401,
                "invalid or missing API key (send it as the password of Basic auth, or as 'Bearer KEY')",
                code="invalid_api_key",
                challenge='Basic realm="kvserve", charset="UTF-8"',
            )

    return authorize
