"""The gateway's HTTP app: OpenAI-compatible completions and chat (``completion_routes``), the
model's routes (``model_routes``: ``/v1/models``, ``/tokenize``, ``/detokenize``, ``/version``),
the operational ones (``admin_routes``: ``/health``, ``/metrics``, ``/admin/nodes``), every error
in OpenAI's format (``errors``), and the API key on ``/v1`` and ``/admin`` when one is set
(``prfaas.server.auth``).  The app's lifespan starts and stops the router and the periodic
throughput log line."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from prfaas.server.auth import add_api_key
from prfaas.server.gateway.admin_routes import admin_routes
from prfaas.server.gateway.completion_routes import completion_routes
from prfaas.server.gateway.errors import install_error_handlers
from prfaas.server.gateway.model_routes import model_routes, prfaas_version
from prfaas.server.gateway.openai_protocol import APIError, from_validation_error
from prfaas.server.gateway.request_log import quiet_http_clients
from prfaas.server.gateway.serving_context import ServingContext

__all__ = ["build_gateway_app", "prfaas_version"]


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_gateway_app(
    router: Any, model_name: str | None = None, api_key: str | None = None
) -> FastAPI:
    """The gateway's app over ``router`` (a ``Router``, or ``prfaas serve``'s
    ``LocalBackend``); with ``api_key``, ``/v1`` and ``/admin`` need it."""
    ctx = ServingContext.of(router, model_name)
    router.metrics.model_name = ctx.served

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        quiet_http_clients()
        await router.start()
        throughput = asyncio.create_task(router.metrics.log.run(lambda: router.admission.inflight))
        yield
        throughput.cancel()
        await router.stop()

    app = FastAPI(title="prfaas gateway", version=prfaas_version(), lifespan=lifespan)
    app.state.begin_shutdown = ctx.stopping.set  # GatewayServer: responses in flight end now
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

    for routes in (admin_routes, model_routes, completion_routes):
        app.include_router(routes(ctx))
    return app
