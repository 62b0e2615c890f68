"""The OpenAI request bodies as pydantic models (``/openapi.json`` describes them).

Ranges are OpenAI's (vLLM's for its extensions): ``temperature`` [0, 2], ``top_p`` (0, 1],
``n`` >= 1, ``max_tokens`` >= 1 (completions: 0 with ``echo``, as vLLM), ``presence_penalty`` / ``frequency_penalty`` [-2, 2],
``logit_bias`` values [-100, 100], ``top_logprobs`` [0, 20] (chat), ``logprobs`` [0, 20]
(completions), ``stop`` at most :data:`MAX_STOP` non-empty strings.  Extensions as in vLLM:
``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``.

Every model forbids unknown keys: a field we do not support is a 400 naming it, never silently
ignored.  Types are strict (no ``"1"`` for a number, no ``true`` for an integer; an integer is a
valid number), NaN and infinities are refused.  ``validation_error`` turns pydantic's error into
the OpenAI error (400, ``param`` the dotted path of the first bad field).  Fields we accept but do
not honour in every value (``response_format``, ``tools``, ``tool_choice``, ``suffix``,
``best_of``) are checked by ``prfaas.server.gateway.openai_protocol``.

Imports no torch (the gateway uses it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 8
MAX_LOGPROBS = 20

_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool | None = None


class TextPart(BaseModel):
    """A content part of a chat message: text only."""

    model_config = _CONFIG
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class _Sampling(BaseModel):
    """The fields completions and chat share."""

    model_config = _CONFIG

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Bias] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None  # the end user, for the caller's own records: no effect on output
    response_format: ResponseFormat | None = None  # only {"type": "text"} (openai_protocol)
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty strings")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo, the prompt alone (as vLLM)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


def _path(loc: tuple[Any, ...]) -> list[str]:
    """pydantic's error location without the body prefix and the union branch names."""
    parts: list[str] = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and (
            p in ("str", "int", "list[int]", "list[str]", "list[list[int]]")
            or p.startswith(("list[", "function-", "dict["))
        ):
            continue
        parts.append(str(p))
    return parts


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as a dotted path (``messages.0.role``)."""
    return ".".join(_path(loc)) or None


def validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The (message, param) of a pydantic validation's errors (the first field in error)."""
    if not errors:
        return "invalid request", None
    # a union's branches each report an error: the one that got furthest says what is wrong
    e = max(errors, key=lambda x: len(_path(tuple(x.get("loc", ())))))
    param = _param(tuple(e.get("loc", ())))
    kind = e.get("type", "")
    if kind == "extra_forbidden":
        return f"{param} is not supported", param
    if kind == "missing":
        return f"{param} is required", param
    if kind in ("json_invalid", "json_type"):
        return "the request body is not valid JSON", None
    if kind in ("model_type", "model_attributes_type", "dict_type") and param is None:
        return "the request body must be a JSON object", None
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param
