from prfaas.engine.engine import EngineConfig, LLMEngine
from prfaas.engine.llm import LLM
from prfaas.engine.request import RequestOutput
from prfaas.engine.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
