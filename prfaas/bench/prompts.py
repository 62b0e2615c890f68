"""Prompts whose shared prefixes follow the trace's ``hash_ids``.

Each hash id maps deterministically (given a seed) to a fixed block of ``block_tokens`` ASCII
characters (lowercase letters and spaces). With the byte-level tokenizer one character is one token,
so a prompt of ``input_len`` characters is ``input_len`` tokens and block ``k`` of the prompt is
tokens ``[k*B, (k+1)*B)``. Two prompts are byte-equal for exactly as many leading blocks as their
``hash_ids`` agree on; the blocks after that are different text. Blocks past the end of ``hash_ids``
(and all blocks of requests without ids) are filler unique to the request.
"""

from __future__ import annotations

import random
from functools import lru_cache

from prfaas.bench.workload import BenchRequest

DEFAULT_BLOCK_TOKENS = 512
_CHARS = "abcdefghijklmnopqrstuvwxyz     "  # ~1 space in 6.2 characters: word-like text


class PromptBuilder:
    """Builds the prompt text of a :class:`BenchRequest` (deterministic in ``seed``)."""

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS, seed: int = 0) -> None:
        if block_tokens < 1:
            raise ValueError(f"--block-tokens must be >= 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self.seed = seed
        self._block = lru_cache(maxsize=8192)(self._make_block)

    def _make_block(self, key: str) -> str:
        rng = random.Random(f"prfaas-bench:{self.seed}:{key}")  # str seeds hash via SHA-512
        return "".join(rng.choices(_CHARS, k=self.block_tokens))

    def block(self, hash_id: int) -> str:
        """The text block of a prefix-block id."""
        return self._block(f"h{int(hash_id)}")

    def filler(self, request_index: int, block_index: int) -> str:
        """A block unique to one request (past its ``hash_ids``)."""
        return self._block(f"r{int(request_index)}:{int(block_index)}")

    def prompt(self, req: BenchRequest) -> str:
        """``req.input_len`` ASCII characters: blocks of ``req.hash_ids`` then filler."""
        if req.input_len < 1:
            raise ValueError(f"request {req.index}: input_len must be >= 1, got {req.input_len}")
        b = self.block_tokens
        n_blocks = -(-req.input_len // b)
        parts = [
            self.block(req.hash_ids[k]) if k < len(req.hash_ids) else self.filler(req.index, k)
            for k in range(n_blocks)
        ]
        return "".join(parts)[: req.input_len]
