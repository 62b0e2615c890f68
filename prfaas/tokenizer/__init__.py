"""Tokenizers, chat templates and stop tokens of a model (a preset or a model directory).

Torch-free: the gateway imports this package without the model code.
"""

from prfaas.tokenizer.base import ByteTokenizer, Tokenizer, stop_ids_of
from prfaas.tokenizer.generation import read_stop_token_ids
from prfaas.tokenizer.hf_json import HFTokenizer
from prfaas.tokenizer.kimi import KimiTokenizer
from prfaas.tokenizer.loader import TokenizerNotFound, load_tokenizer, model_dir

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "KimiTokenizer",
    "Tokenizer",
    "TokenizerNotFound",
    "load_tokenizer",
    "model_dir",
    "read_stop_token_ids",
    "stop_ids_of",
]
