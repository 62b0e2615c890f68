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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prfaas.model.config import resolve_config
from prfaas.model.tokenizer import load_tokenizer
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


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_gateway_app(router: Router, model_name: str | None = None) -> FastAPI:
    cfg = router.cfg
    mcfg = resolve_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model, mcfg.eos_token_id)
    served = model_name or cfg.model
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="prfaas gateway", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(from_validation_error(list(e.errors())))

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
        return {"nodes": router.nodes_info(), "threshold": router.policy.threshold}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": served, "object": "model", "created": created, "owned_by": "prfaas"}],
        }

    async def handle(body: CompletionRequest | ChatCompletionRequest, kind: str) -> Response:
        req = to_generation(body, mcfg.vocab_size)
        if req.model != served:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )
        prompt = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
        gen = await router.generate(prompt, req.params)
        headers = gen.route.headers()
        if req.stream:
            return StreamingResponse(
                _sse(gen, req, kind, served, len(prompt), tokenizer),
                media_type="text/event-stream",
                headers=headers,
            )
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
                await gen.close("decode_failed")
                raise APIError(502, str(e), "server_error", code="decode_node_failed") from None
            asm.finish()
        finally:
            await gen.close()
        return JSONResponse(
            _final_body(gen, kind, served, asm.text, finish, len(prompt), asm.ids), headers=headers
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return await handle(body, "completion")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        return await handle(body, "chat")

    return app


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
    asm = TextAssembler(tokenizer, req.stop)
    first = True
    finish = None
    outcome = "ok"
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
        except DecodeFailed as e:
            outcome = "decode_failed"
            err = APIError(502, str(e), "server_error", code="decode_node_failed")
            yield _sse_line({**err.body(), "prfaas": _prfaas_field(gen, asm.ids)})
        yield "data: [DONE]\n\n"
    finally:
        await gen.close(outcome)
