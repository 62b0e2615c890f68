"""prfaas: Prefill-as-a-Service for hybrid-attention (KDA + MLA) language models."""

from prfaas.engine import LLM, EngineConfig, LLMEngine, RequestOutput, SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
