"""Moved to ``prfaas.tokenizer`` (torch-free, shared with the gateway); kept as an alias."""

from prfaas.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]
