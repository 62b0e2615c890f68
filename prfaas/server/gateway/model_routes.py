"""The routes about the model rather than a generation: OpenAI's ``GET /v1/models`` (with vLLM's
``max_model_len``), vLLM's ``POST /tokenize`` (a prompt, or chat messages under the model's
template) and ``POST /detokenize``, and ``GET /version``.  Prompts get no special tokens on this
server, so ``add_special_tokens: true`` is refused (400) rather than ignored."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from prfaas.server.gateway.openai_models import ChatMessage
from prfaas.server.gateway.openai_protocol import APIError, chat_messages
from prfaas.server.gateway.serving_context import ServingContext


def prfaas_version() -> str:
    try:
        return _pkg_version("prfaas")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without install
        return "0.0.0"


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


def model_routes(ctx: ServingContext) -> APIRouter:
    r = APIRouter()

    @r.get("/version")
    async def version() -> dict[str, str]:
        return {"version": prfaas_version()}

    @r.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": ctx.served,
            "object": "model",
            "created": ctx.created,
            "owned_by": "prfaas",
            "root": ctx.model,
            "parent": None,
            "max_model_len": ctx.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @r.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        ctx.check_model(body.model)
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
            ids = ctx.chat_prompt(chat_messages(body.messages))
        else:
            ids = ctx.tokenizer.encode(body.prompt)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}
        out["token_strs"] = [ctx.token_text(t)[0] for t in ids] if body.return_token_strs else None
        return out

    @r.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        ctx.check_model(body.model)
        if any(not 0 <= t < ctx.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens must be in [0, {ctx.vocab_size})", param="tokens")
        return {"prompt": ctx.tokenizer.decode(body.tokens)}

    return r
