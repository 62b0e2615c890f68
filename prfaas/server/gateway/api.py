"""The gateway's HTTP API: OpenAI-compatible ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (SSE streaming or not), ``/health``, ``/metrics`` and ``/admin/nodes``.

Every response carries its routing: ``x-prfaas-*`` headers and a ``prfaas`` field in the JSON body
(streaming: in the final chunk, the one with ``finish_reason``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prfaas.model.config import resolve_config
from prfaas.server.auth import add_api_key
from prfaas.server.gateway.errors import check_text, install_error_handlers
from prfaas.server.gateway.handover import DecodeFailed, Generation
from prfaas.server.gateway.openai_models import ChatCompletionRequest, CompletionRequest
from prfaas.server.gateway.openai_protocol import (
    APIError,
    GenerationRequest,
    from_validation_error,
    to_generation,
)
from prfaas.server.gateway.router import Router
from prfaas.server.gateway.text_output import TextAssembler
from prfaas.server.streaming import ClosingStreamingResponse, unless_disconnected
from prfaas.tokenizer import load_tokenizer
from prfaas.tokenizer.chat import ChatTemplateError, load_chat_format


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_gateway_app(
    router: Router, model_name: str | None = None, api_key: str | None = None
) -> FastAPI:
    """The gateway's app; with ``api_key``, ``/v1`` and ``/admin`` need it (``auth``)."""
    cfg = router.cfg
    mcfg = resolve_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model, mcfg.eos_token_id)
    chat_format = load_chat_format(cfg.model, tokenizer)
    served = model_name or cfg.model
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="prfaas gateway", lifespan=lifespan)
    add_api_key(app, api_key)
    install_error_handlers(app)  # framework errors and surprises: OpenAI error bodies

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        if errors and tuple(errors[0].get("loc", ())) == ("body",):  # no body at all
            return _error_response(
                APIError(400, "the request body must be a JSON object", code="invalid_json")
            )
        return _error_response(from_validation_error(errors))

    @app.get("/health")
    async def health() -> JSONResponse:
        nodes = router.nodes_info()
        ok = all(n["up"] for n in nodes)
        body = {"status": "ok" if ok else "degraded", "nodes": {n["name"]: n["up"] for n in nodes}}
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/nodes")
    async def admin_nodes() -> dict[str, Any]:
        return {
            "nodes": router.nodes_info(),
            "threshold": router.policy.threshold,
            "inflight": router.admission.inflight,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": served, "object": "model", "created": created, "owned_by": "prfaas"}],
        }

    async def handle(
        request: Request, body: CompletionRequest | ChatCompletionRequest, kind: str
    ) -> Response:
        check_text(body.model_dump())  # a lone surrogate cannot be tokenized: 400, not 500
        req = to_generation(body, mcfg.vocab_size)
        if req.model != served:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )
        if req.messages is not None:
            prompt = _chat_prompt(chat_format, req.messages)
        else:
            prompt = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
        # the client may go away at any time: before the answer, that cancels the work (its
        # clean-up aborts the request on its nodes and releases its admission slot)
        answered, resp = await unless_disconnected(request, respond(req, kind, prompt))
        if answered:
            return resp
        if isinstance(resp, ClosingStreamingResponse) and resp.on_close is not None:
            resp.on_close(False)  # made just as the client left: never sent
        return Response(status_code=499)

    async def respond(req: GenerationRequest, kind: str, prompt: list[int]) -> Response:
        gen = await router.generate(prompt, req.params)
        headers = gen.route.headers()
        if req.stream:
            return ClosingStreamingResponse(
                _sse(gen, req, kind, served, len(prompt), tokenizer),
                on_close=lambda completed: gen.close("ok" if completed else "cancelled"),
                media_type="text/event-stream",
                headers=headers,
            )
        outcome = "cancelled"
        try:
            asm = TextAssembler(tokenizer, req.stop)
            finish = None
            try:
                async for ev in gen.events():
                    asm.add(ev.token_ids)
                    if asm.stopped:
                        finish = "stop"
                        break
                    if ev.finished:
                        finish = ev.finish_reason
            except DecodeFailed as e:
                outcome = _failed_outcome(e)
                raise e.api_error() from None
            asm.finish()
            outcome = "ok"
        finally:
            gen.close(outcome)
        return JSONResponse(
            _final_body(gen, kind, served, asm.text, finish, len(prompt), asm.ids), headers=headers
        )

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await handle(request, body, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest) -> Response:
        return await handle(request, body, "chat")

    return app


def _failed_outcome(e: DecodeFailed) -> str:
    """The ``prfaas_requests_total`` outcome of a decode that failed."""
    return "request_failed" if e.code == "request_failed" else "decode_failed"


def _chat_prompt(chat_format: Any, messages: list[dict[str, Any]]) -> list[int]:
    if chat_format is None:
        raise APIError(
            400, "this model has no chat template; use /v1/completions", param="messages"
        )
    try:
        return chat_format.encode(messages)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None


def _usage(gen: Generation, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.route.cached_tokens},
    }


def _prfaas_field(gen: Generation, ids: list[int]) -> dict[str, Any]:
    return {**gen.route.to_json(), "token_ids": list(ids)}


def _final_body(
    gen: Generation,
    kind: str,
    model: str,
    text: str,
    finish: str | None,
    n_prompt: int,
    ids: list[int],
) -> dict[str, Any]:
    base = {"id": gen.route.request_id, "created": int(time.time()), "model": model}
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
        base["object"] = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        base["object"] = "text_completion"
    return {
        **base,
        "choices": [choice],
        "usage": _usage(gen, n_prompt, len(ids)),
        "prfaas": _prfaas_field(gen, ids),
    }


def _chunk(
    gen: Generation, kind: str, model: str, text: str | None, finish: str | None, first: bool
) -> dict:
    base = {"id": gen.route.request_id, "created": int(time.time()), "model": model}
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        return {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
    return {
        **base,
        "object": "text_completion",
        "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}],
    }


def _sse_line(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(
    gen: Generation, req: GenerationRequest, kind: str, model: str, n_prompt: int, tokenizer: Any
) -> AsyncIterator[str]:
    """The SSE events of one response; the response's ``on_close`` releases ``gen`` whatever
    happens (closed here first with the outcome when the stream ends by itself)."""
    asm = TextAssembler(tokenizer, req.stop)
    first = True
    finish = None
    outcome = "cancelled"
    try:
        try:
            async for ev in gen.events():
                text = asm.add(ev.token_ids)
                if asm.stopped:
                    finish = "stop"
                elif ev.finished:
                    finish = ev.finish_reason
                if finish is not None:
                    text += asm.finish()
                    final = _chunk(gen, kind, model, text, finish, first)
                    final["prfaas"] = _prfaas_field(gen, asm.ids)
                    if req.include_usage:
                        final["usage"] = _usage(gen, n_prompt, len(asm.ids))
                    yield _sse_line(final)
                    break
                if text or first:
                    yield _sse_line(_chunk(gen, kind, model, text, None, first))
                    first = False
            outcome = "ok"
        except DecodeFailed as e:
            outcome = _failed_outcome(e)
            err = e.api_error()
            yield _sse_line({**err.body(), "prfaas": _prfaas_field(gen, asm.ids)})
        yield "data: [DONE]\n\n"
    finally:
        gen.close(outcome)
