"""The gateway's operational routes: ``GET /health`` (every node up: ``ok``, else
``degraded``), ``GET /metrics`` (Prometheus text of the router's registry) and
``GET /admin/nodes`` (each node's state, the routing threshold, requests in flight; behind the
API key when one is set)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from prfaas.server.gateway.serving_context import ServingContext


def admin_routes(ctx: ServingContext) -> APIRouter:
    r = APIRouter()
    router = ctx.router

    @r.get("/health")
    async def health() -> JSONResponse:
        nodes = router.nodes_info()
        ok = all(n["up"] for n in nodes)
        body = {"status": "ok" if ok else "degraded", "nodes": {n["name"]: n["up"] for n in nodes}}
        return JSONResponse(body)

    @r.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @r.get("/admin/nodes")
    async def admin_nodes() -> dict[str, Any]:
        return {
            "nodes": router.nodes_info(),
            "threshold": router.policy.threshold,
            "inflight": router.admission.inflight,
        }

    return r
