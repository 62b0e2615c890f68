"""A request's choices: one generation per choice, ``n`` for each of its prompts (choice index
``prompt_index * n + j``), started together and read to their end.

The first choice of a prompt is handed over before the others start, so they find the prompt's
prefix in the prefill and decode nodes' caches.  With a ``seed``, choice ``j`` samples with
``seed + j``.  If one choice cannot start (or the client leaves), the ones already started are
closed before the error goes on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from prfaas.server.gateway.handover import DecodeFailed, Generation
from prfaas.server.gateway.openai_protocol import GenerationRequest
from prfaas.server.gateway.prompt_scoring import prompt_logprobs
from prfaas.server.gateway.serving_context import ServingContext
from prfaas.server.gateway.text_output import TextAssembler
from prfaas.server.protocol import TokenLogprobMsg


@dataclass
class Choice:
    """One generation's text as it is assembled."""

    index: int
    gen: Generation
    asm: TextAssembler
    prefix: str = ""  # echo: the prompt's text
    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobMsg] | None = None  # echo with logprobs: tokens 1..
    prompt_only: bool = False  # echo with max_tokens 0: the generated token is not answered
    finish: str | None = None
    logprobs: list[TokenLogprobMsg] = field(default_factory=list)
    text_len: int = 0  # characters sent so far (completions' text_offset)
    first: bool = True
    done: bool = False


async def start_choices(
    ctx: ServingContext, req: GenerationRequest
) -> tuple[list[Choice], list[list[int]]]:
    """Every choice's generation, started, and each prompt's token ids."""
    if req.messages is not None:
        prompts = [ctx.chat_prompt(req.messages)]
    else:
        prompts = [ctx.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompts]
    n = req.n
    started: list[Generation] = []

    async def one(ids: list[int], j: int) -> Generation:
        p = req.params
        if j and p.seed is not None:
            p = p.model_copy(update={"seed": p.seed + j})
        g = await ctx.router.generate(ids, p)
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
        # admitted: the prompts fit; echo with logprobs scores them meanwhile
        prompt_lps: list[list[TokenLogprobMsg] | None] = [None] * len(prompts)
        if req.echo and req.logprobs is not None:
            k = req.logprobs
            prompt_lps = [await prompt_logprobs(ctx.router, ids, k) for ids in prompts]
    except BaseException as e:
        for g in started:
            g.close("cancelled")
        raise first_error(e) from None
    choices = []
    for i, t in enumerate(tasks):
        prefix = ""
        if req.echo:
            p = req.prompts[i]
            prefix = p if isinstance(p, str) else ctx.tokenizer.decode(p)
        for j, g in enumerate(t.result()):
            asm = TextAssembler(ctx.tokenizer, req.stop, req.params.min_tokens)
            c = Choice(i * n + j, g, asm, prefix, prompts[i], prompt_lps[i], req.prompt_only)
            choices.append(c)
    return choices, prompts


async def collect(c: Choice) -> None:
    """Read a choice's generation to its end (non-streaming)."""
    if c.prompt_only:
        async for _ in c.gen.events():
            pass
        c.finish = "length"
        return
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


def first_error(e: BaseException) -> BaseException:
    """The first error inside (nested) exception groups, cancellations last."""
    if isinstance(e, BaseExceptionGroup):
        leaves = [first_error(x) for x in e.exceptions]
        return next((x for x in leaves if not isinstance(x, asyncio.CancelledError)), leaves[0])
    return e


def failed_outcome(e: DecodeFailed) -> str:
    """The ``prfaas_requests_total`` outcome of a decode that failed."""
    return "request_failed" if e.code == "request_failed" else "decode_failed"


def prfaas_field(gen: Generation, ids: list[int]) -> dict[str, Any]:
    """The ``prfaas`` routing field of a response (or a choice) and its token ids."""
    return {**gen.route.to_json(), "token_ids": list(ids)}
