"""Sampling parameters and the per-request sampler.

Order of the logits processing (as vLLM applies it), on the model's logits of the position that
samples: ``logit_bias`` added; ``repetition_penalty`` (tokens seen in the prompt or the output:
positive logits divided by it, negative ones multiplied); ``frequency_penalty`` x count and
``presence_penalty`` x (count > 0) subtracted for the output's tokens; while the output has fewer
than ``min_tokens`` tokens, the stop tokens (EOS unless ``ignore_eos``, ``stop_token_ids``) get
-inf.  Then greedy (``temperature`` 0 or ``top_k`` 1) takes the argmax, else temperature, top-k,
top-p, min-p and a seeded draw.

``logprobs`` (an integer k): each sampled token comes with its log-probability and the k most
likely tokens', from ``log_softmax`` of the model's raw logits at that position (before any of
the processing above: vLLM's default ``raw_logprobs``); -inf is reported as -9999.0.

Numerically safe for every valid value: a temperature below ``SAMPLING_EPS`` samples greedily
(dividing by it would overflow the logits), top-p always keeps the most likely token, and a
distribution that is not finite (NaN logits) raises :class:`SamplingError` for that request alone.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

LOGPROB_FLOOR = -9999.0
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    min_p: float = 0.0
    logprobs: int | None = None  # None: none; k: the sampled token's and the top k

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
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20
        ):
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs!r}")
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def processes_logits(self) -> bool:
        """Some processing changes the logits before the draw (penalties, bias, min_tokens)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )

    @property
    def plain_greedy(self) -> bool:
        """The token is the argmax of the model's logits and nothing else is needed of them: the
        engine's fast path (no logits copied to the host, pipelined decode)."""
        return self.greedy and not self.processes_logits and self.logprobs is None


@dataclass
class TokenLogprob:
    """One sampled token's log-probability and the top alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Draws one token per request from its logits. The randomness of output token ``index`` depends
    only on (seed, index), so results do not depend on batching, chunking, preemption or on which node
    (prefill or decode) draws the token."""

    def __init__(self, params: SamplingParams, default_seed: int) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else default_seed
        self.gen = torch.Generator()

    def process(
        self,
        logits: torch.Tensor,
        prompt: Sequence[int] = (),
        output: Sequence[int] = (),
        stop_ids: Collection[int] = (),
    ) -> torch.Tensor:
        """The logits after bias, penalties and min_tokens (float32, a new tensor)."""
        p = self.params
        x = logits.detach().float().cpu().clone()
        vocab = x.numel()
        if p.logit_bias:
            ids = [t for t in p.logit_bias if 0 <= t < vocab]
            x[ids] += torch.tensor([p.logit_bias[t] for t in ids])
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
            if seen.numel():
                v = x[seen]
                x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if output and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(list(output)), minlength=vocab)[:vocab].float()
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if len(output) < p.min_tokens and stop_ids:
            x[[t for t in stop_ids if 0 <= t < vocab]] = float("-inf")
        return x

    def sample(
        self,
        logits: torch.Tensor,
        index: int,
        prompt: Sequence[int] = (),
        output: Sequence[int] = (),
        stop_ids: Collection[int] = (),
    ) -> int:
        p = self.params
        if p.processes_logits:
            logits = self.process(logits, prompt, output, stop_ids)
        if p.greedy:
            return int(torch.argmax(logits))
        x = logits.float().cpu()
        if bool(torch.isnan(x).any()) or bool(torch.isposinf(x).any()):
            raise SamplingError("the logits are not finite")
        x = x / p.temperature  # >= SAMPLING_EPS: finite (-inf: tokens the processing banned)
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
        if p.min_p > 0:
            probs = probs * (probs >= p.min_p * probs.max())
        total = probs.sum()
        if not bool(torch.isfinite(total)) or float(total) <= 0:
            raise SamplingError(f"no token left to sample (probability mass {float(total)})")
        self.gen.manual_seed((self.seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
        return int(torch.multinomial(probs / total, 1, generator=self.gen))

    def logprobs(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        """``token``'s log-probability under the raw ``logits`` and the top ``params.logprobs``."""
        lp = torch.log_softmax(logits.detach().float().cpu(), -1).clamp_min(LOGPROB_FLOOR)
        k = min(self.params.logprobs or 0, lp.numel())
        top: list[tuple[int, float]] = []
        if k:
            vals, ids = torch.topk(lp, k)
            top = list(zip(ids.tolist(), vals.tolist(), strict=True))
        return TokenLogprob(token, float(lp[token]), top)


@torch.inference_mode()
def prompt_logprobs(
    model: torch.nn.Module, prompt: Sequence[int], k: int
) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it and the ``k`` most likely
    tokens there (None for the first token: nothing comes before it), as vLLM's
    ``prompt_logprobs``: ``log_softmax`` of the raw logits, -inf reported as ``LOGPROB_FLOOR``.

    From the model's cache-free forward over the whole prompt (``HybridForCausalLM.forward``), one
    position's vocabulary at a time on the host side, so memory stays one (T, vocab) tensor on the
    model's device."""
    if not prompt:
        return []
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    dev = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
    logits = model(ids)[0, :-1]  # position i predicts token i + 1
    out: list[TokenLogprob | None] = [None]
    targets = ids[0, 1:]
    step = 256
    for s in range(0, logits.shape[0], step):
        lp = torch.log_softmax(logits[s : s + step].float(), -1).clamp_min(LOGPROB_FLOOR)
        tok = lp.gather(1, targets[s : s + step, None])[:, 0].tolist()
        if k:
            vals, top_ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
            tops = [
                list(zip(i, v, strict=True))
                for i, v in zip(top_ids.tolist(), vals.tolist(), strict=True)
            ]
        else:
            tops = [[] for _ in tok]
        for t, v, top in zip(targets[s : s + step].tolist(), tok, tops, strict=True):
            out.append(TokenLogprob(t, v, top))
    return out
