"""Sampling parameters and the per-request sampler (greedy, temperature, top-k, top-p, seeds).

Numerically safe for every valid value: a temperature below ``SAMPLING_EPS`` samples greedily
(dividing by it would overflow the logits), top-p always keeps the most likely token, and a
distribution that is not finite (NaN logits) raises :class:`SamplingError` for that request alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (as vLLM does)


class SamplingError(RuntimeError):
    """One request's token could not be drawn (its logits are not a distribution)."""


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = no top-k
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(
                f"top_k must be -1 (disabled) or a positive integer, got {self.top_k!r}"
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


class Sampler:
    """Draws one token per request from its logits. The randomness of output token ``index`` depends
    only on (seed, index), so results do not depend on batching, chunking, preemption or on which node
    (prefill or decode) draws the token."""

    def __init__(self, params: SamplingParams, default_seed: int) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else default_seed
        self.gen = torch.Generator()

    def sample(self, logits: torch.Tensor, index: int) -> int:
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        x = logits.float().cpu()
        if not bool(torch.isfinite(x).all()):
            raise SamplingError("the logits are not finite")
        x = x / p.temperature  # >= SAMPLING_EPS: finite
        if p.top_k > 0:
            kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, -1)
        if p.top_p < 1.0:
            sp, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < p.top_p  # smallest set reaching top_p
            keep[0] = True  # the most likely token, whatever rounding did
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter_(0, idx, sp)
        total = probs.sum()
        if not bool(torch.isfinite(total)) or float(total) <= 0:
            raise SamplingError(f"no token left to sample (probability mass {float(total)})")
        self.gen.manual_seed((self.seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
        return int(torch.multinomial(probs / total, 1, generator=self.gen))
