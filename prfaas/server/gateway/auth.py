"""API keys, as ``vllm serve --api-key`` has them: every ``/v1/...`` request needs the header
``Authorization: Bearer KEY`` (else 401 with OpenAI's error body); ``/health``, ``/metrics``,
``/version`` and the tokenizer routes stay open.  Keys are compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

PROTECTED_PREFIX = "/v1"


def require_api_key(app: FastAPI, key: str | None) -> None:
    """Refuse ``/v1`` requests without ``Bearer key`` (nothing changes when ``key`` is empty)."""
    if not key:
        return
    want = f"Bearer {key}".encode()

    @app.middleware("http")
    async def _check(request: Request, call_next: Callable[[Request], Awaitable[Response]]):  # noqa: ANN202
        if request.url.path.startswith(PROTECTED_PREFIX):
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, want):
                body = {
                    "error": {
                        "message": "invalid or missing API key (Authorization: Bearer KEY)",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                }
                return JSONResponse(body, status_code=401)
        return await call_next(request)
