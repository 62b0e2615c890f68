"""The gateway's side of the control plane: one typed call per node route (messages in
``prfaas.server.protocol``), over one pooled ``httpx.AsyncClient`` (``http``, replaceable, e.g. by
an in-process transport in tests).

Failures: ``httpx.HTTPError`` (node unreachable, or a non-2xx answer where noted), ``ValueError``
(an answer that is not the expected message), ``PrefillFailed`` (a prefill or decode open the node
refused with a 5xx), ``APIError`` 400 (the node refused the request as malformed).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from prfaas.server.auth import control_headers
from prfaas.server.gateway.openai_protocol import APIError
from prfaas.server.protocol import (
    CacheEventsReply,
    DecodeRequest,
    NodeState,
    PrefillRequest,
    PrefillResult,
    PrefixCopy,
    PrefixCopyResult,
    PrefixPublishResult,
    PrefixRequest,
    PromptScore,
    PromptScoreResult,
    RoleAdmin,
    error_code,
    error_message,
)

STATE_TIMEOUT_S = 2.0
log = logging.getLogger("prfaas.server.router")


@dataclass
class NodeEndpoint:
    """Where the gateway reaches one node."""

    name: str
    cluster: str
    role: str
    url: str


class PrefillFailed(Exception):
    """A node answered a prefill (or a decode open) with a server error (or ``wrong_role``):
    ``status`` its HTTP status and ``code`` its error code (``transfer_failed``: a prefill node's
    transfer of the KV to the decode node failed; ``overloaded``, ``wrong_role``, ...; None when
    the answer names none)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def node_error(status: int, text: str | bytes, ep: NodeEndpoint) -> Exception:
    """The exception for a node's non-200 answer: 400 -> APIError 400 (the request's fault),
    except ``wrong_role`` (the node switched roles after the gateway last polled it: the node's
    state, not the request's, so it is tried elsewhere), else PrefillFailed."""
    msg, code = error_message(text), error_code(text)
    if status == 400 and code != "wrong_role":
        return APIError(400, msg)
    return PrefillFailed(f"{ep.name}: HTTP {status}: {msg}", status, code)


class NodeClient:
    def __init__(self, secret: str, http: httpx.AsyncClient | None = None) -> None:
        """``secret``: the deployment's; every call carries the control token derived from it."""
        self.http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(10.0), limits=httpx.Limits(max_connections=1000)
        )
        self.http.headers.update(control_headers(secret))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def state(self, ep: NodeEndpoint) -> NodeState:
        r = await self.http.get(ep.url + "/state", timeout=STATE_TIMEOUT_S)
        r.raise_for_status()
        return NodeState.model_validate_json(r.content)

    async def switch_role(self, ep: NodeEndpoint, role: str, timeout: float = 60.0) -> NodeState:
        """Ask a drained PD node to serve in ``role`` (``POST /admin/role``)."""
        r = await self.http.post(
            ep.url + "/admin/role",
            content=RoleAdmin(role=role).to_json(),
            headers={"content-type": "application/json"},
            timeout=timeout,
        )
        if r.status_code != 200:
            raise PrefillFailed(
                f"{ep.name}: role switch: HTTP {r.status_code}: {error_message(r.text)}"
            )
        return NodeState.model_validate_json(r.content)

    async def cache_events(self, ep: NodeEndpoint, since: int) -> CacheEventsReply:
        r = await self.http.get(
            ep.url + "/internal/cache_events", params={"since": since}, timeout=STATE_TIMEOUT_S
        )
        r.raise_for_status()
        return CacheEventsReply.model_validate_json(r.content)

    async def prefix_publish(self, ep: NodeEndpoint, req: PrefixRequest) -> PrefixPublishResult:
        r = await self.http.post(
            ep.url + "/internal/prefix_publish",
            content=req.to_json(),
            headers={"content-type": "application/json"},
        )
        r.raise_for_status()
        return PrefixPublishResult.model_validate_json(r.content)

    async def prefix_copy(
        self, ep: NodeEndpoint, req: PrefixCopy, timeout_s: float
    ) -> PrefixCopyResult:
        r = await self.http.post(
            ep.url + "/internal/prefix_copy",
            content=req.to_json(),
            headers={"content-type": "application/json"},
            timeout=timeout_s,
        )
        r.raise_for_status()
        return PrefixCopyResult.model_validate_json(r.content)

    async def prefill(
        self, ep: NodeEndpoint, req: PrefillRequest, timeout_s: float
    ) -> PrefillResult:
        r = await self.http.post(
            ep.url + "/internal/prefill",
            content=req.to_json(),
            headers={"content-type": "application/json"},
            timeout=timeout_s,
        )
        if r.status_code != 200:
            raise node_error(r.status_code, r.content, ep)
        return PrefillResult.model_validate_json(r.content)

    async def prompt_logprobs(
        self, ep: NodeEndpoint, req: PromptScore, timeout_s: float
    ) -> PromptScoreResult:
        r = await self.http.post(
            ep.url + "/internal/prompt_logprobs",
            content=req.to_json(),
            headers={"content-type": "application/json"},
            timeout=timeout_s,
        )
        if r.status_code != 200:
            raise node_error(r.status_code, r.content, ep)
        return PromptScoreResult.model_validate_json(r.content)

    async def open_decode(
        self, ep: NodeEndpoint, req: DecodeRequest
    ) -> tuple[httpx.Response, AsyncIterator[str]]:
        """The decode stream's response (close it with ``aclose``) and its lines."""
        hreq = self.http.build_request(
            "POST",
            ep.url + "/internal/decode",
            content=req.to_json(),
            headers={"content-type": "application/json"},
            timeout=httpx.Timeout(10.0, read=None),
        )
        resp = await self.http.send(hreq, stream=True)
        if resp.status_code != 200:
            try:
                text = await resp.aread()
            finally:  # cancelled too (the open timed out): the connection goes back
                await resp.aclose()
            raise node_error(resp.status_code, text, ep)
        return resp, resp.aiter_lines()

    async def abort(self, ep: NodeEndpoint, rid: str) -> None:
        """Abort ``rid`` on ``ep`` (whatever its role holds of it: prefill, transfer, decode)."""
        r = await self.http.post(ep.url + f"/internal/abort/{rid}", timeout=5)
        r.raise_for_status()

    async def abort_quietly(self, ep: NodeEndpoint, rid: str) -> None:
        """``abort``, ignoring a node that cannot be reached (it lost the request anyway)."""
        try:
            await self.abort(ep, rid)
        except httpx.HTTPError as e:
            log.info("abort of %s on %s failed: %s", rid, ep.name, e)
