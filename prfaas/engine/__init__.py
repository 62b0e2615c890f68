from prfaas.engine.config import EngineConfig
from prfaas.engine.engine import LLMEngine
from prfaas.engine.llm import LLM
from prfaas.engine.request import RequestOutput
from prfaas.engine.sampling import SamplingParams
from prfaas.engine.stats import EngineStats

__all__ = ["LLM", "EngineConfig", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams"]
