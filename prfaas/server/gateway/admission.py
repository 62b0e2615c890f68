"""Admission control at the gateway: a prompt the deployment can hold (non-empty, shorter than
``max_model_len - 1`` tokens) and at most ``router.max_inflight`` requests in flight (else 429 with
``Retry-After``)."""

from __future__ import annotations

from prfaas.server.gateway.metrics import RouterMetrics
from prfaas.server.gateway.openai_protocol import APIError


class Admission:
    def __init__(self, max_model_len: int, max_inflight: int, metrics: RouterMetrics) -> None:
        self.max_model_len, self.max_inflight, self.metrics = max_model_len, max_inflight, metrics
        self.inflight = 0

    def admit(self, prompt: list[int]) -> None:
        """Count one more request in flight; APIError 400 (bad prompt) or 429 (at the limit)."""
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt) >= self.max_model_len - 1:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; at most {self.max_model_len - 2} are accepted",
                param="prompt",
                code="context_length_exceeded",
            )
        if self.inflight >= self.max_inflight:
            self.metrics.requests.labels("rejected_429").inc()
            raise APIError(
                429,
                f"the server is at its limit of {self.max_inflight} requests in flight; retry later",
                "rate_limit_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        self.metrics.v_running.labels(self.metrics.model_name).set(self.inflight)

    def release(self, outcome: str) -> None:
        """One admitted request is over (``outcome``: ok, error_502, decode_failed, ...)."""
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)
        self.metrics.v_running.labels(self.metrics.model_name).set(self.inflight)
        self.metrics.requests.labels(outcome).inc()
