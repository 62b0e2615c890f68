"""What the gateway's route modules share about the model they serve: the backend that runs
requests (a ``Router``, or ``prfaas serve``'s ``LocalBackend``), the tokenizer and chat format,
the served name and context length, and the checks every route makes of a request's ``model``
and chat messages (``APIError`` 400/404), and ``stopping``: set once the server begins to stop
(``prfaas.server.gateway.serve.GatewayServer``), so the responses still running end at once (503
``server_shutdown``, or that error as the last SSE event) instead of holding the exit.  Imports
no torch."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prfaas.model.config import resolve_config
from prfaas.server.gateway.openai_output import TokenText
from prfaas.server.gateway.openai_protocol import APIError
from prfaas.tokenizer import Tokenizer, load_tokenizer
from prfaas.tokenizer.chat import ChatTemplateError, load_chat_format

T = TypeVar("T")


@dataclass
class ServingContext:
    router: Any  # Router or LocalBackend: generate(), metrics, admission, nodes_info(), ...
    model: str  # the preset or model directory
    served: str  # the name clients use
    tokenizer: Tokenizer
    chat_format: Any  # prfaas.tokenizer.chat's format, or None (no chat template)
    vocab_size: int
    max_model_len: int
    created: int = field(default_factory=lambda: int(time.time()))
    # set when the server begins to stop: responses in flight end at once
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.tokenizer)

    @classmethod
    def of(cls, router: Any, model_name: str | None = None) -> ServingContext:
        """The context of ``router``'s model (``model_name``: the served name, default the
        model's own)."""
        model = router.cfg.model
        mcfg = resolve_config(model)
        tokenizer = load_tokenizer(model, mcfg.eos_token_id)
        return cls(
            router=router,
            model=model,
            served=model_name or model,
            tokenizer=tokenizer,
            chat_format=load_chat_format(model, tokenizer),
            vocab_size=mcfg.vocab_size,
            max_model_len=router.admission.max_model_len,
        )

    def check_model(self, name: str | None) -> None:
        """404 unless ``name`` is None or the served model's."""
        if name is not None and name != self.served:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.served!r}",
                param="model",
                code="model_not_found",
            )

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids of validated chat messages under the model's template (400 when it
        has none or the template refuses them)."""
        if self.chat_format is None:
            raise APIError(
                400, "this model has no chat template; use /v1/completions", param="messages"
            )
        try:
            return self.chat_format.encode(messages)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None

    async def unless_stopping(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``'s result, or (cancelled) a 503 ``server_shutdown`` once the server stops."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled() or not task.done():
            raise shutdown_error()
        return task.result()


def shutdown_error() -> APIError:
    """What a request still running when the server stops gets."""
    return APIError(503, "the server is shutting down", "server_error", code="server_shutdown")
