"""The OpenAI-compatible surface: a validated request body (``openai_models``) turned into what the
gateway runs (``GenerationRequest``), and error bodies.

Chat: the gateway encodes ``GenerationRequest.messages`` with the model's own template
(``prfaas.tokenizer.chat``; the presets': every message becomes ``<|ROLE|>\\nCONTENT\\n`` and the
prompt ends with ``<|assistant|>\\n``).

Errors: ``APIError`` carries OpenAI's body ``{"error": {"message", "type", "param", "code"}}``;
a bad or unsupported field is a 400 whose ``param`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from prfaas.server.gateway.openai_models import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    validation_error,
)
from prfaas.server.protocol import SamplingParamsMsg


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


def unsupported(param: str, what: str | None = None) -> APIError:
    return APIError(
        400, f"{what or param} is not supported", param=param, code="unsupported_parameter"
    )


def from_validation_error(e: ValidationError | list[dict[str, Any]]) -> APIError:
    """The OpenAI 400 of a pydantic validation error (the first bad field named)."""
    errors = e.errors() if isinstance(e, ValidationError) else list(e)
    message, param = validation_error(errors)
    kind = errors[0].get("type") if errors else None
    if kind == "extra_forbidden":
        return unsupported(param or "", message.removesuffix(" is not supported"))
    return bad(message, param)


@dataclass
class GenerationRequest:
    """A parsed completion / chat request: ``prompts`` (completions: one entry per prompt, text
    or token ids) or ``messages`` (chat: one prompt, encoded by the gateway with the model's chat
    template), each prompt answered with ``n`` choices."""

    kind: str  # "completion" | "chat"
    prompts: list[str | list[int]]
    params: SamplingParamsMsg
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    n: int = 1
    echo: bool = False  # completions: the prompt's text (and with logprobs its logprobs) first
    prompt_only: bool = False  # echo with max_tokens 0: the prompt alone, no generated token
    logprobs: int | None = None  # top alternatives per token (0: the sampled token's only)
    # chat: the validated messages (None-valued keys dropped, a missing content is "")
    messages: list[dict[str, Any]] | None = None


def chat_messages(msgs: list[ChatMessage]) -> list[dict[str, Any]]:
    return [
        {**m.model_dump(exclude_none=True), "content": m.model_dump()["content"] or ""}
        for m in msgs
    ]


def _prompts(p: Any, vocab_size: int) -> list[str | list[int]]:
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif p and all(isinstance(t, int) for t in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if not prompts:
        raise bad("prompt must not be empty", "prompt")
    for x in prompts:
        if not x:
            raise bad("prompt must not be empty", "prompt")
        if isinstance(x, list) and any(not 0 <= t < vocab_size for t in x):
            raise bad(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    return prompts


def to_generation(
    req: CompletionRequest | ChatCompletionRequest, vocab_size: int
) -> GenerationRequest:
    """What the gateway runs of a validated body; APIError 400 for values we do not serve."""
    messages = None
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(
            400,
            f"response_format {req.response_format.type!r} is not supported: this server has no "
            'structured output (guided decoding); only {"type": "text"}',
            param="response_format",
            code="unsupported_parameter",
        )
    prompt_only = False
    if isinstance(req, ChatCompletionRequest):
        if req.tools:
            raise unsupported("tools")
        if req.tool_choice not in (None, "none"):
            raise unsupported("tool_choice")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        messages = chat_messages(req.messages)
        prompts: list[str | list[int]] = []  # the gateway encodes the messages
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        echo = False
        max_tokens = req.max_completion_tokens or req.max_tokens
        kind = "chat"
    else:
        if req.suffix:
            raise unsupported("suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise unsupported("best_of", "best_of other than n")
        prompts = _prompts(req.prompt, vocab_size)
        logprobs, echo, max_tokens, kind = req.logprobs, req.echo, req.max_tokens, "completion"
        if max_tokens == 0:
            if not echo:
                raise bad("max_tokens: 0 only with echo (the prompt alone)", "max_tokens")
            prompt_only, max_tokens = True, 1  # one token generated, not answered (as vLLM)
    bias: dict[int, float] = {}
    for k, v in (req.logit_bias or {}).items():
        if not k.isdigit() or int(k) >= vocab_size:
            raise bad(
                f"logit_bias keys must be token ids in [0, {vocab_size}), got {k!r}", "logit_bias"
            )
        bias[int(k)] = float(v)
    stop_ids = list(req.stop_token_ids or [])
    if any(t >= vocab_size for t in stop_ids):
        raise bad(f"stop_token_ids must be token ids in [0, {vocab_size})", "stop_token_ids")
    top_k = req.top_k if req.top_k not in (None, 0) else -1
    try:
        params = SamplingParamsMsg(
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=top_k,
            max_tokens=max_tokens or 16,
            seed=req.seed,
            stop_token_ids=stop_ids,
            ignore_eos=req.ignore_eos,
            presence_penalty=float(req.presence_penalty),
            frequency_penalty=float(req.frequency_penalty),
            repetition_penalty=float(req.repetition_penalty),
            logit_bias=bias,
            min_tokens=req.min_tokens,
            min_p=float(req.min_p),
            logprobs=logprobs,
        )
    except ValidationError as e:
        raise from_validation_error(e) from None
    so = req.stream_options
    return GenerationRequest(
        kind=kind,
        prompts=prompts,
        params=params,
        stop=req.stops,
        stream=req.stream,
        include_usage=bool(so and so.include_usage),
        model=req.model,
        n=req.n,
        echo=echo,
        prompt_only=prompt_only,
        logprobs=logprobs,
        messages=messages,
    )


def parse_request(body: Any, kind: str, vocab_size: int) -> GenerationRequest:
    """Validate an OpenAI request body (APIError 400 with a clear message when bad)."""
    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None
    return to_generation(req, vocab_size)
