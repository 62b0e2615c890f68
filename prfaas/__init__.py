"""prfaas: Prefill-as-a-Service for hybrid-attention (KDA + MLA) language models."""

__version__ = "0.1.0"
