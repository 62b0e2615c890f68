"""The OpenAI-compatible surface: request parsing/validation, the chat template, error bodies.

Chat template (byte tokenizer, documented in docs/serving.md): every message becomes
``<|ROLE|>\\nCONTENT\\n`` and the prompt ends with ``<|assistant|>\\n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prfaas.server.protocol import SamplingParamsMsg

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP = 8


class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


@dataclass
class GenerationRequest:
    """A parsed completion / chat request."""

    kind: str  # "completion" | "chat"
    prompt: str | list[int]
    params: SamplingParamsMsg
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: str = ""


def apply_chat_template(messages: Any) -> str:
    """The byte-tokenizer chat template (see module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role must be one of {list(CHAT_ROLES)}", "messages")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for p in content:
                if (
                    not isinstance(p, dict)
                    or p.get("type") != "text"
                    or not isinstance(p.get("text"), str)
                ):
                    raise bad(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(p["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        out.append(f"<|{role}|>\n{content}\n")
    out.append("<|assistant|>\n")
    return "".join(out)


def _num(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{key} must be a number", key)
    if not lo <= v <= hi:
        raise bad(f"{key} must be in [{lo}, {hi}], got {v}", key)
    return float(v)


def _int(body: dict, key: str, default: int | None, lo: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{key} must be an integer", key)
    if v < lo:
        raise bad(f"{key} must be >= {lo}, got {v}", key)
    return v


def parse_request(body: Any, kind: str, vocab_size: int) -> GenerationRequest:
    """Validate an OpenAI request body (APIError 400 with a clear message when bad)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required (a string)", "model")
    if kind == "chat":
        prompt: str | list[int] = apply_chat_template(body.get("messages"))
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if not p:
                raise bad("prompt must not be empty", "prompt")
            prompt = p
        elif (
            isinstance(p, list)
            and p
            and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        ):
            if any(not 0 <= t < vocab_size for t in p):
                raise bad(f"prompt token ids must be in [0, {vocab_size})", "prompt")
            prompt = list(p)
        elif isinstance(p, list) and len(p) > 1:
            raise bad("one prompt per request (batches of prompts are not supported)", "prompt")
        else:
            raise bad("prompt must be a non-empty string or a list of token ids", "prompt")
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise bad("only n = 1 is supported", "n")
    for unsupported in ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools"):
        v = body.get(unsupported)
        if v not in (None, False, 0, 1) or (unsupported in ("tools", "suffix") and v):
            raise bad(f"{unsupported} is not supported", unsupported)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 16, 1)
    temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must be > 0", "top_p")
    top_k = _int(body, "top_k", -1, -1)
    seed = _int(body, "seed", None, -(2**63))
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise bad(f"stop: at most {MAX_STOP} non-empty strings", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in stop_ids
    ):
        raise bad(
            f"stop_token_ids must be a list of token ids in [0, {vocab_size})", "stop_token_ids"
        )
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be a boolean", "ignore_eos")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad("stream_options must be an object", "stream_options")
    try:
        params = SamplingParamsMsg(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k if top_k != 0 else -1,
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=list(stop_ids),
            ignore_eos=ignore_eos,
        )
    except ValueError as e:
        raise bad(str(e)) from None
    return GenerationRequest(
        kind, prompt, params, stops, stream, bool(so.get("include_usage", False)), model
    )
