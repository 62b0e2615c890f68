"""OpenAI's response shapes: completion and chat bodies, stream chunks, usage, and logprobs
(completions: ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``; chat:
``content`` entries with ``token``, ``logprob``, ``bytes`` and ``top_logprobs``).

A token's text is the tokenizer's decoding of that token alone; its ``bytes`` are the byte
tokenizer's byte itself (ids < 256), else the UTF-8 of that text.  Imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prfaas.server.protocol import TokenLogprobMsg
from prfaas.tokenizer import ByteTokenizer, Tokenizer


def response_id(request_id: str, kind: str) -> str:
    """``cmpl-...`` for completions, ``chatcmpl-...`` for chat (OpenAI's prefixes)."""
    base = request_id.removeprefix("cmpl-")
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + base


def object_name(kind: str, chunk: bool) -> str:
    if kind == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


class TokenText:
    """Token id -> (text, bytes), cached."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer, ByteTokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, tid: int) -> tuple[str, list[int]]:
        hit = self._cache.get(tid)
        if hit is None:
            text = self.tokenizer.decode([tid])
            if self.byte_level:
                raw = [tid] if 0 <= tid < 256 else []
            else:
                raw = list(text.encode("utf-8"))
            hit = self._cache[tid] = (text, raw)
        return hit


def completion_logprobs(
    lps: Sequence[TokenLogprobMsg],
    tt: TokenText,
    offset: int = 0,
    unscored: Sequence[int] = (),
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object of ``lps``; ``offset``: the text offset of the
    first token (characters of the choice's text before it); ``unscored``: tokens before ``lps``
    that have no log-probability (``echo``: the prompt's first token), null in
    ``token_logprobs`` and ``top_logprobs`` (as vLLM)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid in unscored:
        text = tt(tid)[0]
        tokens.append(text)
        token_lps.append(None)
        tops.append(None)
        offsets.append(offset)
        offset += len(text)
    for lp in lps:
        text = tt(lp.token_id)[0]
        tokens.append(text)
        token_lps.append(lp.logprob)
        top = {text: lp.logprob}
        for tid, v in lp.top:
            top.setdefault(tt(tid)[0], v)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(lps: Sequence[TokenLogprobMsg], tt: TokenText) -> dict[str, Any]:
    """The chat ``logprobs`` object of ``lps``."""
    content = []
    for lp in lps:
        text, raw = tt(lp.token_id)
        top = []
        for tid, v in lp.top:
            t, b = tt(tid)
            top.append({"token": t, "logprob": v, "bytes": b})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def choice_body(
    kind: str, index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    if kind == "chat":
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": logprobs,
        }
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def choice_chunk(
    kind: str,
    index: int,
    text: str | None,
    finish: str | None,
    first: bool,
    logprobs: dict[str, Any] | None,
) -> dict[str, Any]:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
    return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
