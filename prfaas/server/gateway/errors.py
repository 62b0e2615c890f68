"""The gateway's answers to bad input and to its own failures, always in OpenAI's error format
``{"error": {"message", "type", "param", "code"}}`` (no torch).

* a body FastAPI cannot parse (malformed JSON, not UTF-8, nested too deep, a number with too
  many digits) and any other HTTP error of the framework (unknown route 404, wrong method 405):
  that status with an OpenAI body (``install_error_handlers``);
* text that cannot be encoded (a lone UTF-16 surrogate such as ``"\\ud800"``, which JSON allows):
  400 naming the field (``check_text``);
* an unexpected exception: 500 ``internal_error`` with an OpenAI body (logged with its traceback),
  never a bare text page.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prfaas.server.gateway.openai_protocol import APIError

log = logging.getLogger("prfaas.server.gateway")

_CODES = {
    400: "invalid_json",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}
_MESSAGES = {
    "There was an error parsing the body": "the request body is not valid JSON (malformed, not "
    "UTF-8, nested too deeply, or a number with too many digits)",
}


def _body(status: int, message: str, code: str | None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return APIError(status, message, kind, code=code).body()


def install_error_handlers(app: FastAPI) -> None:
    """Framework HTTP errors and unexpected exceptions answered in OpenAI's format."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        msg = _MESSAGES.get(detail, detail)
        return JSONResponse(
            _body(e.status_code, msg, _CODES.get(e.status_code)),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse(
            _body(500, f"internal error: {type(e).__name__}", "internal_error"), status_code=500
        )


def _first_unencodable(obj: Any, path: str) -> str | None:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        where = _first_unencodable(v, f"{path}.{k}" if path else str(k))
        if where is not None:
            return where
    return None


def check_text(fields: dict[str, Any]) -> None:
    """APIError 400 naming the first string in ``fields`` (nested) that is not valid Unicode."""
    where = _first_unencodable(fields, "")
    if where is not None:
        raise APIError(
            400,
            f"{where}: the text is not valid Unicode (a lone UTF-16 surrogate)",
            param=where,
            code="invalid_value",
        )
