"""The SSE answer of a streamed completion or chat request: every choice's chunks, interleaved as
their tokens come.  With ``include_usage`` every chunk has ``usage: null`` and a last chunk with
no choices carries the usage (as OpenAI sends it); ``data: [DONE]`` ends the stream.  A choice's
final chunk (the one with ``finish_reason``) carries its ``prfaas`` routing field; a decode that
fails mid-stream sends an OpenAI error object (with ``prfaas``) and ends the stream; so does a
server that begins to stop (``server_shutdown``); ``[DONE]`` follows either.

The response's ``on_close`` releases every generation whatever happens; the stream closes each
one first with its outcome when it ends by itself."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from prfaas.server.gateway.choices import Choice, failed_outcome, prfaas_field
from prfaas.server.gateway.handover import DecodeFailed
from prfaas.server.gateway.openai_output import (
    chat_logprobs,
    choice_chunk,
    completion_logprobs,
    object_name,
    usage,
)
from prfaas.server.gateway.openai_protocol import GenerationRequest
from prfaas.server.gateway.serving_context import ServingContext, shutdown_error
from prfaas.server.protocol import TokenLogprobMsg


def sse_line(obj: dict[str, Any]) -> str:
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


async def _on_stop(ctx: ServingContext, queue: asyncio.Queue) -> None:
    await ctx.stopping.wait()
    await queue.put((None, None))


async def sse(
    choices: list[Choice],
    req: GenerationRequest,
    kind: str,
    rid: str,
    ctx: ServingContext,
    n_prompt: int,
    cached: int,
) -> AsyncIterator[str]:
    """The SSE lines of ``choices`` (see the module docstring)."""
    created = int(time.time())
    model, tt = ctx.served, ctx.token_text
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.create_task(_pump(c, queue)) for c in choices]
    pumps.append(asyncio.create_task(_on_stop(ctx, queue)))
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
            obj["prfaas"] = prfaas_field(c.gen, c.asm.ids)
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
                lp = None
                if c.prompt_logprobs is not None:
                    lp = completion_logprobs(c.prompt_logprobs, tt, 0, c.prompt_ids[:1])
                yield sse_line(
                    chunk(choice_chunk(kind, c.index, c.prefix, None, True, lp), c, False)
                )
                c.first = False
                c.text_len = len(c.prefix)
        left = len(choices)
        while left:
            c, ev = await queue.get()
            if c is None:  # the server is stopping
                yield sse_line(shutdown_error().body())
                break
            if isinstance(ev, DecodeFailed):
                outcome = failed_outcome(ev)
                err = ev.api_error()
                yield sse_line({**err.body(), "prfaas": prfaas_field(c.gen, c.asm.ids)})
                break
            if c.done:
                continue
            if ev is None:  # the stream ended without a finished event: nothing more to say
                c.done, left = True, left - 1
                continue
            if c.prompt_only:  # echo with max_tokens 0: its one token is not answered
                text, lp = "", None
                c.finish = "length" if ev.finished else None
            else:
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
                yield sse_line(chunk(ch, c, final=c.finish is not None))
                c.first = False
                c.text_len += len(text)
            if c.finish is not None:
                c.done, left = True, left - 1
                c.gen.close("ok")
        else:
            if req.include_usage:
                yield sse_line(
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
