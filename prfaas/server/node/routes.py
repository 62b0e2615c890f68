"""The node's HTTP routes (FastAPI): parse the protocol message, call the node's part, answer the
result message or a coded error (``prfaas.server.protocol.ErrorBody``)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prfaas.server.auth import add_node_auth
from prfaas.server.node.decode import Aborted as DecodeAborted
from prfaas.server.node.decode import Overloaded
from prfaas.server.node.metrics import node_registry
from prfaas.server.node.prefill import Aborted as PrefillAborted
from prfaas.server.protocol import (
    AbortResult,
    DecodeRequest,
    ErrorBody,
    ErrorDetail,
    LinkAdmin,
    LinkAdminResult,
    Message,
    NodeHealth,
    PrefillRequest,
    PrefixCopy,
    PrefixRequest,
    PromptScore,
    RoleAdmin,
)
from prfaas.server.streaming import ClosingStreamingResponse
from prfaas.transfer.errors import TransferError

if TYPE_CHECKING:  # pragma: no cover
    from prfaas.server.node.server import NodeServer

log = logging.getLogger("prfaas.server.node")


def _err(status: int, code: str, message: str) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


def _ok(msg: Message) -> Response:
    return Response(msg.to_json(), media_type="application/json")


def build_node_app(node: NodeServer) -> FastAPI:
    app = FastAPI(title=f"prfaas node {node.node.name}")
    add_node_auth(app, node.cfg.secret)  # every route but /health: the deployment's token
    name = node.node.name

    @app.get("/health")
    async def health() -> Response:
        return _ok(NodeHealth(name=name, role=node.role, pid=os.getpid()))

    @app.post("/admin/role")
    async def admin_role(request: Request) -> Response:
        try:
            body = RoleAdmin.model_validate_json(await request.body())
        except ValueError:
            return _err(400, "bad_request", 'body must be {"role": "prefill"|"decode"}')
        try:
            return _ok(await node.switch_role(body.role))
        except ValueError as e:
            return _err(409, "busy", str(e))

    @app.get("/state")
    async def state() -> Response:
        return _ok(node.state())

    registry = node_registry(node.state, node.cfg.model, lambda: node.engine.stats().preemptions)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/link")
    async def admin_link(request: Request) -> Response:
        try:
            body = LinkAdmin.model_validate_json(await request.body())
        except ValueError:
            return _err(400, "bad_request", 'body must be {"cluster": NAME, "up": true|false}')
        try:
            if body.cluster:
                node.cfg.cluster(body.cluster)
        except ValueError as e:
            return _err(400, "bad_request", str(e))
        aborted = node.prefill.cut_link(body.cluster, body.up)
        return _ok(LinkAdminResult(cluster=body.cluster, up=body.up, aborted=aborted))

    @app.post("/internal/prefill")
    async def prefill(request: Request) -> Response:
        if node.role != "prefill":
            return _err(400, "wrong_role", f"{name} is a {node.role} node")
        try:
            req = PrefillRequest.model_validate_json(await request.body())
            return _ok(await node.prefill.prefill(req))
        except ValueError as e:
            return _err(400, "bad_request", str(e))
        except PrefillAborted as e:
            return _err(409, "aborted", str(e))
        except (TransferError, OSError, TimeoutError) as e:
            node.counters.prefill_failures += 1
            return _err(503, "transfer_failed", f"{type(e).__name__}: {e}")

    @app.post("/internal/decode")
    async def decode(request: Request) -> Response:
        if node.role != "decode":
            return _err(400, "wrong_role", f"{name} is a {node.role} node")
        try:
            req = DecodeRequest.model_validate_json(await request.body())
            exp, token_start = await node.decode.open(req)
        except ValueError as e:
            return _err(400, "bad_request", str(e))
        except Overloaded as e:
            return _err(503, "overloaded", str(e))
        except DecodeAborted as e:
            return _err(409, "aborted", str(e))
        # the router going away (or the stream ending any way) drops the request here
        return ClosingStreamingResponse(
            node.decode.stream(exp, token_start),
            on_close=lambda completed: node.decode.drop(exp),
            media_type="application/x-ndjson",
        )

    @app.get("/internal/cache_events")
    async def cache_events(since: int = 0) -> Response:
        return _ok(await node.pool.events_since(since))

    @app.post("/internal/prefix_publish")
    async def prefix_publish(request: Request) -> Response:
        try:
            req = PrefixRequest.model_validate_json(await request.body())
            return _ok(await node.pool.publish(req))
        except ValueError as e:
            return _err(400, "bad_request", str(e))

    @app.post("/internal/prefix_copy")
    async def prefix_copy(request: Request) -> Response:
        try:
            req = PrefixCopy.model_validate_json(await request.body())
            return _ok(await node.pool.copy(req))
        except ValueError as e:
            return _err(400, "bad_request", str(e))
        except Exception as e:  # noqa: BLE001 - a failed copy means: recompute
            log.warning("prefix copy failed: %s", e)
            return _err(503, "copy_failed", f"{type(e).__name__}: {e}")

    @app.post("/internal/prompt_logprobs")
    async def prompt_logprobs(request: Request) -> Response:
        try:
            req = PromptScore.model_validate_json(await request.body())
            return _ok(await node.score_prompt(req))
        except ValueError as e:
            return _err(400, "bad_request", str(e))

    @app.post("/internal/abort/{rid}")
    async def abort(rid: str) -> Response:
        held = node.prefill.abort(rid) if node.role == "prefill" else node.decode.abort(rid)
        return _ok(AbortResult(aborted=held))

    return app
