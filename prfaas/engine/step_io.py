"""Between the scheduler's rows and the model, for one engine step: :func:`model_inputs` (each
row's tokens at its positions, with its cache blocks and state slot) and :func:`row_tokens` (each
sampling row's next token from its row of logits).

Rows are a ``SchedulerOutput``'s rows, in order; logits are (rows, vocab), on any device; tokens
are vocabulary ids; a row that does not sample gets None. Greedy rows take their token from one
batched argmax; the others go through their request's sampler (:func:`next_token`) on host logits.
"""

from __future__ import annotations

from collections.abc import Callable, Set

import torch

from prfaas.engine.request import Request
from prfaas.engine.sampling import SamplingParams
from prfaas.engine.schedule_types import ScheduledRow, SchedulerOutput
from prfaas.model.batch import SeqInput


def model_inputs(sched: SchedulerOutput) -> list[SeqInput]:
    """The model inputs of ``sched``'s rows: each row's tokens at its positions; ``ahead``
    rows' token is not known on the host yet (a placeholder)."""
    toks: list[int] = []
    for row in sched.rows:
        n = row.num_tokens
        toks += [0] * n if sched.ahead else row.request.token_slice(row.start, n)
    ids = torch.tensor(toks).split([r.num_tokens for r in sched.rows])  # a view per row
    out = []
    for row, t in zip(sched.rows, ids, strict=True):
        seq = row.request.cache
        assert seq is not None
        out.append(SeqInput(t, row.start, seq.blocks, seq.slot))
    return out


def row_tokens(
    rows: list[ScheduledRow],
    logits: torch.Tensor,
    model_stop_ids: Set[int],
    on_error: Callable[[Request, str], None],
) -> list[int | None]:
    """Each sampling row's next token (None for the others). A request whose sampling raises is
    handed to ``on_error(request, message)`` (it ends, alone) and its row gets None."""
    # one device-to-host copy per step: every row's argmax, and the logits themselves only
    # when some row samples (a per-row copy would synchronise once per request)
    argmax = logits.argmax(-1).tolist()
    if not all(r.request.params.plain_greedy for r in rows):
        logits = logits.cpu()
    tokens: list[int | None] = []
    for row, lg, top in zip(rows, logits, argmax, strict=True):
        req = row.request
        if not row.samples:
            tokens.append(None)
        elif req.params.plain_greedy:
            tokens.append(top)
        else:
            try:
                tokens.append(next_token(req, lg, top, model_stop_ids))
            except Exception as e:  # noqa: BLE001 - this request ends with the error, alone
                on_error(req, f"sampling failed: {type(e).__name__}: {e}")
                tokens.append(None)  # its row is dropped (the request ended)
    return tokens


def next_token(req: Request, logits: torch.Tensor, argmax: int, model_stop_ids: Set[int]) -> int:
    """The next token of ``req`` from its row of logits (``argmax``: already known); its
    log-probabilities recorded when asked for. ``model_stop_ids``: the model's stop tokens."""
    p = req.params
    if p.plain_greedy:
        return argmax
    if p.greedy and not p.processes_logits:
        tok = argmax
    elif not p.processes_logits:
        tok = req.sampler.sample(logits, len(req.output))
    else:
        tok = req.sampler.sample(
            logits, len(req.output), req.prompt, req.output, held_back(p, model_stop_ids)
        )
    if p.logprobs is not None:
        req.logprobs.append(req.sampler.logprobs(logits, tok))
    return tok


def held_back(p: SamplingParams, model_stop_ids: Set[int]) -> list[int]:
    """The tokens ``min_tokens`` holds back: the request's stop tokens and, unless it
    ignores EOS, the model's."""
    return list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(model_stop_ids))
