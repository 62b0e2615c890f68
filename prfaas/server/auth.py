"""Authentication of the deployment's HTTP APIs (no torch).

Clients -> gateway (``--api-key`` / ``PRFAAS_API_KEY``, as vLLM has it): every ``/v1`` and
``/admin`` route needs ``Authorization: Bearer KEY``; ``/health`` (and ``/metrics``,
``/openapi.json``, ``/docs``) stay open.  A missing or wrong key gets 401 with an OpenAI error
body (``invalid_api_key``).  :class:`APIKeyMiddleware` is plain ASGI (streaming responses and
disconnects pass through untouched); any app can add it (``add_api_key``).

Gateway -> nodes: every node route but ``/health`` needs ``Authorization: Bearer TOKEN`` with
``TOKEN = control_token(secret)``, an HMAC of the deployment's shared ``secret`` (the secret itself
never crosses the wire; it also keys the KV port's HMAC handshake).  A node bound to a
non-loopback address refuses to start with the placeholder secret of the shipped configs
(``check_node_secret``).

Keys are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

API_KEY_ENV = "PRFAAS_API_KEY"
# the secret of the shipped local config: fine on loopback, refused anywhere else
PLACEHOLDER_SECRETS = frozenset({"prfaas-local-dev-secret-change-me"})
GATEWAY_PROTECTED = ("/v1", "/admin")
NODE_OPEN = ("/health", "/metrics")  # Prometheus scrapes nodes without the control token


def resolve_api_key(arg: str | None) -> str | None:
    """The gateway's API key: ``--api-key``, else ``$PRFAAS_API_KEY``, else none (open)."""
    key = arg if arg is not None else os.environ.get(API_KEY_ENV)
    return key or None


def control_token(secret: str) -> str:
    """The bearer token of the gateway's calls to the nodes, derived from the shared secret."""
    return hmac.new(secret.encode(), b"prfaas control plane v1", hashlib.sha256).hexdigest()


def control_headers(secret: str) -> dict[str, str]:
    """Headers that authenticate a call to a node (tests, benchmarks, the gateway's client)."""
    return {"authorization": f"Bearer {control_token(secret)}"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_node_secret(host: str, secret: str) -> None:
    """ValueError if a node bound to ``host`` would run with a placeholder secret off loopback."""
    if not is_loopback(host) and secret in PLACEHOLDER_SECRETS:
        raise ValueError(
            f"refusing to bind {host} with the placeholder secret {secret!r}: set a secret of "
            "your own in the deployment file (it authenticates the KV port and the control plane)"
        )


def _bearer(scope: Scope) -> bytes | None:
    """The raw bearer token of a request (None without one)."""
    for k, v in scope.get("headers", ()):
        if k == b"authorization":
            scheme, _, token = v.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def _unauthorized_body() -> bytes:
    return json.dumps(
        {
            "error": {
                "message": "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    ).encode()


class APIKeyMiddleware:
    """ASGI middleware: HTTP requests whose path starts with one of ``protected`` (or, with
    ``protected`` None, every path but ``open_paths``) need ``Authorization: Bearer <key>``."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str,
        protected: Iterable[str] | None = GATEWAY_PROTECTED,
        open_paths: Iterable[str] = (),
    ) -> None:
        if not api_key:
            raise ValueError("an empty API key would let everyone in")
        self.app = app
        self.key = api_key.encode()
        self.protected = tuple(protected) if protected is not None else None
        self.open_paths = tuple(open_paths)

    def _needs_key(self, path: str) -> bool:
        if self.protected is None:
            return path not in self.open_paths
        return any(path == p or path.startswith(p + "/") for p in self.protected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if self._needs_key(scope.get("path", "")):
            token = _bearer(scope)
            if token is None or not hmac.compare_digest(token, self.key):
                body = _unauthorized_body()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def add_api_key(app: Any, api_key: str | None) -> None:
    """Protect a gateway-like app's ``/v1`` and ``/admin`` routes with ``api_key`` (None: open)."""
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)


def add_node_auth(app: Any, secret: str) -> None:
    """Protect every route of a node app but ``/health`` with the deployment's control token."""
    app.add_middleware(
        APIKeyMiddleware, api_key=control_token(secret), protected=None, open_paths=NODE_OPEN
    )
