"""OpenAI's ``POST /v1/completions`` and ``POST /v1/chat/completions``: the body validated
(``openai_models``, ``openai_protocol``), its choices started (``choices``), then answered as one
JSON body or as SSE (``completion_stream``).

Every response carries its routing: ``x-prfaas-*`` headers (of the first choice) and a ``prfaas``
field in the JSON body (streaming: in each choice's final chunk); with several choices each choice
has its own ``prfaas`` too.  A client that goes away before the answer cancels the work (its
clean-up aborts the requests on their nodes and releases their admission slots)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from prfaas.server.gateway.choices import (
    collect,
    failed_outcome,
    first_error,
    prfaas_field,
    start_choices,
)
from prfaas.server.gateway.completion_stream import sse
from prfaas.server.gateway.errors import check_text
from prfaas.server.gateway.handover import DecodeFailed
from prfaas.server.gateway.openai_models import ChatCompletionRequest, CompletionRequest
from prfaas.server.gateway.openai_output import (
    chat_logprobs,
    choice_body,
    completion_logprobs,
    object_name,
    response_id,
    usage,
)
from prfaas.server.gateway.openai_protocol import GenerationRequest, to_generation
from prfaas.server.gateway.serving_context import ServingContext
from prfaas.server.streaming import ClosingStreamingResponse, unless_disconnected


def completion_routes(ctx: ServingContext) -> APIRouter:
    r = APIRouter()

    async def handle(
        request: Request, body: CompletionRequest | ChatCompletionRequest, kind: str
    ) -> Response:
        check_text(body.model_dump())  # a lone surrogate cannot be tokenized: 400, not 500
        req = to_generation(body, ctx.vocab_size)
        ctx.check_model(req.model)
        answered, resp = await unless_disconnected(request, respond(req, kind))
        if answered:
            return resp
        if isinstance(resp, ClosingStreamingResponse) and resp.on_close is not None:
            resp.on_close(False)  # made just as the client left: never sent
        return Response(status_code=499)

    async def respond(req: GenerationRequest, kind: str) -> Response:
        choices, prompts = await start_choices(ctx, req)
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
                sse(choices, req, kind, rid, ctx, n_prompt, cached),
                on_close=on_close,
                media_type="text/event-stream",
                headers=headers,
            )
        outcome = "cancelled"

        async def collect_all() -> None:
            async with asyncio.TaskGroup() as tg:
                for c in choices:
                    tg.create_task(collect(c))

        try:
            await ctx.unless_stopping(collect_all())
            outcome = "ok"
        except BaseException as e:
            err = first_error(e)
            if isinstance(err, DecodeFailed):
                outcome = failed_outcome(err)
                raise err.api_error() from None
            raise err from None
        finally:
            for c in choices:
                c.gen.close(outcome)
        out = []
        for c in choices:
            lp = None
            if req.logprobs is not None and kind == "chat":
                lp = chat_logprobs(c.logprobs, ctx.token_text)
            elif c.prompt_logprobs is not None:  # echo: the prompt's tokens, then the output's
                lps = c.prompt_logprobs + c.logprobs
                lp = completion_logprobs(lps, ctx.token_text, 0, c.prompt_ids[:1])
            elif req.logprobs is not None:
                lp = completion_logprobs(c.logprobs, ctx.token_text, len(c.prefix))
            ch = choice_body(kind, c.index, c.prefix + c.asm.text, c.finish, lp)
            if len(choices) > 1:
                ch["prfaas"] = prfaas_field(c.gen, c.asm.ids)
            out.append(ch)
        completion_tokens = sum(len(c.asm.ids) for c in choices)
        body_out = {
            "id": rid,
            "object": object_name(kind, chunk=False),
            "created": int(time.time()),
            "model": ctx.served,
            "choices": out,
            "usage": usage(n_prompt, completion_tokens, cached),
            "prfaas": prfaas_field(first, choices[0].asm.ids),
        }
        return JSONResponse(body_out, headers=headers)

    @r.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await handle(request, body, "completion")

    @r.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest) -> Response:
        return await handle(request, body, "chat")

    return r
