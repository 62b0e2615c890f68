"""The prompt's log-probabilities for ``echo`` with ``logprobs`` (as vLLM answers it: each prompt
token after the first, given the ones before it, with the top ``k``).

``prfaas serve``'s backend computes them in its engine thread (its ``prompt_logprobs``); a
two-cluster deployment asks one of its prefill nodes (``POST /internal/prompt_logprobs``), the
PD cluster's first when it is available (no link to cross), else any available prefill node.
A node that fails to score (answers an error, or does not answer: then it is marked down) is the
client's 503."""

from __future__ import annotations

from typing import Any

import httpx

from prfaas.server.gateway.node_client import NodeEndpoint, PrefillFailed
from prfaas.server.gateway.openai_protocol import APIError
from prfaas.server.protocol import PromptScore, TokenLogprobMsg

TIMEOUT_S = 300.0


def _scoring_node(router: Any) -> NodeEndpoint | None:
    """The prefill node that scores: the PD cluster's first available, else any available."""
    eps = [e for e in router.endpoints.values() if e.role == "prefill"]
    eps.sort(key=lambda e: e.cluster != router.pd)
    return next((e for e in eps if router.live.available(e)), None)


async def prompt_logprobs(router: Any, ids: list[int], k: int) -> list[TokenLogprobMsg]:
    """The log-probabilities of ``ids[1:]`` and the top ``k`` at each position."""
    local = getattr(router, "prompt_logprobs", None)
    if local is not None:
        return await local(ids, k)
    ep = _scoring_node(router)
    if ep is None:
        raise APIError(503, "no prefill node is available to score the prompt", "server_error")
    try:
        res = await router.nodes.prompt_logprobs(
            ep, PromptScore(prompt_token_ids=ids, k=k), TIMEOUT_S
        )
    except PrefillFailed as e:
        raise APIError(503, f"scoring the prompt failed: {e}", "server_error") from None
    except httpx.HTTPError as e:  # the node did not answer: down until a poll finds it again
        router.mark_down(ep.name)
        raise APIError(503, f"{ep.name} did not score the prompt: {e!r}", "server_error") from None
    return res.logprobs
