"""The gateway's HTTP API: OpenAI-compatible ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (SSE streaming or not), vLLM's ``/tokenize``, ``/detokenize`` and
``/version``, ``/health``, ``/metrics`` and ``/admin/nodes``.

A request runs one generation per choice: ``n`` choices for each of its prompts (choice index
``prompt_index * n + j``).  The first choice of a prompt is handed over before the others start, so
they find the prompt's prefix in the prefill and decode nodes' caches.  With a ``seed``, choice
``j`` samples with ``seed + j``.

Every response carries its routing: ``x-prfaas-*`` headers (of the first choice) and a ``prfaas``
field in the JSON body (streaming: in each choice's final chunk, the one with ``finish_reason``);
with several choices each choice has its own ``prfaas`` too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from prfaas.model.config import resolve_config
from prfaas.server.auth import add_api_key
from prfaas.server.gateway.errors import check_text, install_error_handlers
from prfaas.server.gateway.handover import DecodeFailed, Generation
from prfaas.server.gateway.openai_models import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from prfaas.server.gateway.openai_output import (
    TokenText,
    chat_logprobs,
    choice_body,
    choice_chunk,
    completion_logprobs,
    object_name,
    response_id,
    usage,
)
from prfaas.server.gateway.openai_protocol import (
    APIError,
    GenerationRequest,
    chat_messages,
    from_validation_error,
    to_generation,
)
from prfaas.server.gateway.request_log import quiet_http_clients
from prfaas.server.gateway.router import Router
from prfaas.server.gateway.text_output import TextAssembler
from prfaas.server.protocol import TokenLogprobMsg
from prfaas.server.streaming import ClosingStreamingResponse, unless_disconnected
from prfaas.tokenizer import load_tokenizer
from prfaas.tokenizer.chat import ChatTemplateError, load_chat_format


def prfaas_version() -> str:
    try:
        return _pkg_version("prfaas")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without install
        return "0.0.0"


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---- vLLM's tokenizer endpoints ---------------------------------------------------------------
class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = None  # this server adds none (False); True is refused
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]


# ---- one choice -------------------------------------------------------------------------------
@dataclass
class Choice:
    """One generation's text as it is assembled."""

    index: int
    gen: Generation
    asm: TextAssembler
    prefix: str = ""  # echo: the prompt's text
    finish: str | None = None
    logprobs: list[TokenLogprobMsg] = field(default_factory=list)
    text_len: int = 0  # characters sent so far (completions' text_offset)
    first: bool = True
    done: bool = False


def build_gateway_app(
    router: Router, model_name: str | None = None, api_key: str | None = None
) -> FastAPI:
    """The gateway's app; with ``api_key``, ``/v1`` and ``/admin`` need it (``auth``)."""
    cfg = router.cfg
    mcfg = resolve_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model, mcfg.eos_token_id)
    chat_format = load_chat_format(cfg.model, tokenizer)
    token_text = TokenText(tokenizer)
    served = model_name or cfg.model
    created = int(time.time())
    max_model_len = router.admission.max_model_len
    router.metrics.model_name = served

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        quiet_http_clients()
        await router.start()
        throughput = asyncio.create_task(router.metrics.log.run(lambda: router.admission.inflight))
        yield
        throughput.cancel()
        await router.stop()

    app = FastAPI(title="prfaas gateway", version=prfaas_version(), lifespan=lifespan)
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

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": prfaas_version()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": served,
            "object": "model",
            "created": created,
            "owned_by": "prfaas",
            "root": cfg.model,
            "parent": None,
            "max_model_len": max_model_len,
        }
        return {"object": "list", "data": [card]}

    def check_model(name: str | None) -> None:
        if name is not None and name != served:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        check_model(body.model)
        if body.add_special_tokens:
            raise APIError(
                400,
                "add_special_tokens: prompts get no special tokens on this server",
                param="add_special_tokens",
            )
        if isinstance(body, TokenizeChatRequest):
            if not body.add_generation_prompt:
                raise APIError(
                    400,
                    "add_generation_prompt false is not supported",
                    param="add_generation_prompt",
                )
            ids = _chat_prompt(chat_format, chat_messages(body.messages))
        else:
            ids = tokenizer.encode(body.prompt)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
        out["token_strs"] = [token_text(t)[0] for t in ids] if body.return_token_strs else None
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        check_model(body.model)
        if any(not 0 <= t < mcfg.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens must be in [0, {mcfg.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    async def start(req: GenerationRequest) -> tuple[list[Choice], list[list[int]]]:
        """Every choice's generation, started; if one cannot start (or the client leaves), the
        ones already started are closed before the error goes on."""
        if req.messages is not None:
            prompts = [_chat_prompt(chat_format, req.messages)]
        else:
            prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompts]
        n = req.n
        started: list[Generation] = []

        async def one(ids: list[int], j: int) -> Generation:
            p = req.params
            if j and p.seed is not None:
                p = p.model_copy(update={"seed": p.seed + j})
            g = await router.generate(ids, p)
            started.append(g)
            return g

        async def one_prompt(ids: list[int]) -> list[Generation]:
            first = await one(ids, 0)  # its prefill fills the caches the other choices reuse
            async with asyncio.TaskGroup() as tg:
                rest = [tg.create_task(one(ids, j)) for j in range(1, n)]
            return [first, *(t.result() for t in rest)]

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(one_prompt(p)) for p in prompts]
        except BaseException as e:
            for g in started:
                g.close("cancelled")
            raise _first_error(e) from None
        choices = []
        for i, t in enumerate(tasks):
            prefix = ""
            if req.echo:
                p = req.prompts[i]
                prefix = p if isinstance(p, str) else tokenizer.decode(p)
            for j, g in enumerate(t.result()):
                choices.append(Choice(i * n + j, g, TextAssembler(tokenizer, req.stop), prefix))
        return choices, prompts

    async def handle(
        request: Request, body: CompletionRequest | ChatCompletionRequest, kind: str
    ) -> Response:
        check_text(body.model_dump())  # a lone surrogate cannot be tokenized: 400, not 500
        req = to_generation(body, mcfg.vocab_size)
        check_model(req.model)
        # the client may go away at any time: before the answer, that cancels the work (its
        # clean-up aborts the requests on their nodes and releases their admission slots)
        answered, resp = await unless_disconnected(request, respond(req, kind))
        if answered:
            return resp
        if isinstance(resp, ClosingStreamingResponse) and resp.on_close is not None:
            resp.on_close(False)  # made just as the client left: never sent
        return Response(status_code=499)

    async def respond(req: GenerationRequest, kind: str) -> Response:
        choices, prompts = await start(req)
        first = choices[0].gen
        rid = response_id(first.route.request_id, kind)
        n_prompt = sum(len(p) for p in prompts)
        cached = sum(c.gen.route.cached_tokens for c in choices if c.index % req.n == 0)
        headers = first.route.headers()
        if req.stream:

            def on_close(completed: bool) -> None:
                for c in choices:
                    c.gen.close("ok" if completed else "cancelled")

            return ClosingStreamingResponse(
                _sse(choices, req, kind, rid, served, n_prompt, cached, token_text),
                on_close=on_close,
                media_type="text/event-stream",
                headers=headers,
            )
        outcome = "cancelled"
        try:
            async with asyncio.TaskGroup() as tg:
                for c in choices:
                    tg.create_task(_collect(c))
            outcome = "ok"
        except BaseException as e:
            err = _first_error(e)
            if isinstance(err, DecodeFailed):
                outcome = _failed_outcome(err)
                raise err.api_error() from None
            raise err from None
        finally:
            for c in choices:
                c.gen.close(outcome)
        out = []
        for c in choices:
            lp = None
            if req.logprobs is not None:
                lp = (
                    chat_logprobs(c.logprobs, token_text)
                    if kind == "chat"
                    else completion_logprobs(c.logprobs, token_text, len(c.prefix))
                )
            ch = choice_body(kind, c.index, c.prefix + c.asm.text, c.finish, lp)
            if len(choices) > 1:
                ch["prfaas"] = _prfaas_field(c.gen, c.asm.ids)
            out.append(ch)
        completion_tokens = sum(len(c.asm.ids) for c in choices)
        body_out = {
            "id": rid,
            "object": object_name(kind, chunk=False),
            "created": int(time.time()),
            "model": served,
            "choices": out,
            "usage": usage(n_prompt, completion_tokens, cached),
            "prfaas": _prfaas_field(first, choices[0].asm.ids),
        }
        return JSONResponse(body_out, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await handle(request, body, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest) -> Response:
        return await handle(request, body, "chat")

    return app


def _first_error(e: BaseException) -> BaseException:
    """The first error inside (nested) exception groups, cancellations last."""
    if isinstance(e, BaseExceptionGroup):
        leaves = [_first_error(x) for x in e.exceptions]
        return next((x for x in leaves if not isinstance(x, asyncio.CancelledError)), leaves[0])
    return e


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


async def _collect(c: Choice) -> None:
    """Read a choice's generation to its end (non-streaming)."""
    async for ev in c.gen.events():
        c.asm.add(ev.token_ids)
        if ev.logprobs:
            c.logprobs.extend(ev.logprobs)
        if c.asm.stopped:
            c.finish = c.gen.finish_reason = "stop"
            break
        if ev.finished:
            c.finish = ev.finish_reason
    c.asm.finish()


def _prfaas_field(gen: Generation, ids: list[int]) -> dict[str, Any]:
    return {**gen.route.to_json(), "token_ids": list(ids)}


def _sse_line(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _pump(c: Choice, queue: asyncio.Queue) -> None:
    """Put a choice's events on the shared queue: (choice, event), (choice, None) at its end,
    (choice, exception) on a failure."""
    try:
        async for ev in c.gen.events():
            await queue.put((c, ev))
        await queue.put((c, None))
    except DecodeFailed as e:
        await queue.put((c, e))


async def _sse(
    choices: list[Choice],
    req: GenerationRequest,
    kind: str,
    rid: str,
    model: str,
    n_prompt: int,
    cached: int,
    tt: TokenText,
) -> AsyncIterator[str]:
    """The SSE stream of every choice, interleaved as their tokens come; with
    ``include_usage`` every chunk has ``usage: null`` and a last chunk with no choices carries
    the usage (as OpenAI sends it).  The response's ``on_close`` releases every generation
    whatever happens (closed here first with the outcome when the stream ends by itself)."""
    created = int(time.time())
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.create_task(_pump(c, queue)) for c in choices]
    outcome = "cancelled"

    def chunk(choice: dict[str, Any], c: Choice, final: bool) -> dict[str, Any]:
        obj = {
            "id": rid,
            "object": object_name(kind, chunk=True),
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if req.include_usage:
            obj["usage"] = None
        if final:
            obj["prfaas"] = _prfaas_field(c.gen, c.asm.ids)
        return obj

    def lp_of(c: Choice, lps: list[TokenLogprobMsg] | None) -> dict[str, Any] | None:
        if req.logprobs is None:
            return None
        if kind == "chat":
            return chat_logprobs(lps or [], tt)
        return completion_logprobs(lps or [], tt, c.text_len)

    try:
        # echo: the prompt's text first, one chunk per choice
        for c in choices:
            if c.prefix:
                yield _sse_line(
                    chunk(choice_chunk(kind, c.index, c.prefix, None, True, None), c, False)
                )
                c.first = False
                c.text_len = len(c.prefix)
        left = len(choices)
        while left:
            c, ev = await queue.get()
            if isinstance(ev, DecodeFailed):
                outcome = _failed_outcome(ev)
                err = ev.api_error()
                yield _sse_line({**err.body(), "prfaas": _prfaas_field(c.gen, c.asm.ids)})
                break
            if c.done:
                continue
            if ev is None:  # the stream ended without a finished event: nothing more to say
                c.done, left = True, left - 1
                continue
            text = c.asm.add(ev.token_ids)
            if c.asm.stopped:
                c.finish = c.gen.finish_reason = "stop"
            elif ev.finished:
                c.finish = ev.finish_reason
            if c.finish is not None:
                text += c.asm.finish()
            lp = lp_of(c, ev.logprobs)
            if c.finish is not None or text or c.first or (lp is not None and ev.token_ids):
                ch = choice_chunk(kind, c.index, text, c.finish, c.first, lp)
                yield _sse_line(chunk(ch, c, final=c.finish is not None))
                c.first = False
                c.text_len += len(text)
            if c.finish is not None:
                c.done, left = True, left - 1
                c.gen.close("ok")
        else:
            if req.include_usage:
                yield _sse_line(
                    {
                        "id": rid,
                        "object": object_name(kind, chunk=True),
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(n_prompt, sum(len(c.asm.ids) for c in choices), cached),
                    }
                )
            outcome = "ok"
        yield "data: [DONE]\n\n"
    finally:
        for t in pumps:
            t.cancel()
        for c in choices:
            c.gen.close(outcome if not c.done else "ok")
