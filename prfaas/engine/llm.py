"""The offline API, in vLLM's style: ``LLM(model="tiny").generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Sequence

from prfaas.engine.engine import EngineConfig, LLMEngine
from prfaas.engine.request import RequestOutput
from prfaas.engine.sampling import SamplingParams


class LLM:
    def __init__(self, model: str = "tiny", **kwargs: object) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))  # type: ignore[arg-type]

    @property
    def tokenizer(self):  # noqa: ANN201
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = [
            self.engine.add_request(p if isinstance(p, str) else list(p), sp)
            for p, sp in zip(prompts, params, strict=True)
        ]
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]
