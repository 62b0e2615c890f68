"""What a node's KV cache looks like per layer (``CacheLayout``, made by the cache itself:
``HybridCache.layout``): the transfer receiver checks every announced request against it before it
allocates anything. Sizes are bytes; ``TOKENS`` marks the variable token dimension."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

TOKENS = -1  # placeholder for the variable token dimension in a TensorSpec shape

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
LAYER_KINDS = ("mla", "kda")


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype (ValueError for unsupported ones)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}") from None


@dataclass(frozen=True)
class TensorSpec:
    """dtype and shape of one cache tensor; ``TOKENS`` marks the variable token dimension."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        dtype_name(self.dtype)
        if sum(1 for d in self.shape if d == TOKENS) > 1:
            raise ValueError(f"at most one token dimension allowed, got shape {self.shape}")
        if any(d < 0 and d != TOKENS for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")

    @property
    def has_tokens(self) -> bool:
        return TOKENS in self.shape

    def resolve(self, n_tokens: int) -> tuple[int, ...]:
        """The concrete shape for ``n_tokens`` carried tokens."""
        return tuple(n_tokens if d == TOKENS else d for d in self.shape)

    def nbytes(self, n_tokens: int) -> int:
        n = 1
        for d in self.resolve(n_tokens):
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class CacheLayout:
    """Model fingerprint, layer kinds and per-kind tensors (name -> spec, in wire order)."""

    model_fingerprint: str
    layer_kinds: tuple[str, ...]
    kind_tensors: Mapping[str, Mapping[str, TensorSpec]]
    max_tokens: int

    def __post_init__(self) -> None:
        if not self.model_fingerprint:
            raise ValueError("model_fingerprint must be non-empty")
        if not self.layer_kinds:
            raise ValueError("a layout needs at least one layer")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        for kind in set(self.layer_kinds):
            if kind not in self.kind_tensors or not self.kind_tensors[kind]:
                raise ValueError(f"layer kind {kind!r} has no tensor specs")

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    def layer_specs(self, layer: int) -> Mapping[str, TensorSpec]:
        """Tensor name -> spec of model layer ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        return self.kind_tensors[self.layer_kinds[layer]]

    def request_nbytes(self, n_tokens: int) -> int:
        """Payload bytes of a request carrying ``n_tokens`` tokens of MLA KV."""
        return sum(
            spec.nbytes(n_tokens)
            for layer in range(self.num_layers)
            for spec in self.layer_specs(layer).values()
        )

    @classmethod
    def kimi_linear(
        cls,
        model_fingerprint: str,
        layer_kinds: Sequence[str],
        *,
        kv_dim: int = 576,
        kv_dtype: torch.dtype = torch.bfloat16,
        kda_heads: int = 32,
        head_dim: int = 128,
        conv_kernel: int = 4,
        conv_dtype: torch.dtype = torch.float32,
        max_tokens: int = 131072,
    ) -> CacheLayout:
        """Layout of a Kimi-Linear-style hybrid: MLA ``kv`` (T, kv_dim); KDA ``state`` + ``conv``."""
        bad = [k for k in layer_kinds if k not in LAYER_KINDS]
        if bad:
            raise ValueError(f"unknown layer kinds {bad}; expected {LAYER_KINDS}")
        return cls(
            model_fingerprint=model_fingerprint,
            layer_kinds=tuple(layer_kinds),
            kind_tensors={
                "mla": {"kv": TensorSpec(kv_dtype, (TOKENS, kv_dim))},
                "kda": {
                    "state": TensorSpec(torch.float32, (kda_heads, head_dim, head_dim)),
                    "conv": TensorSpec(conv_dtype, (3, kda_heads * head_dim, conv_kernel - 1)),
                },
            },
            max_tokens=max_tokens,
        )

    @classmethod
    def kimi_linear_48b(
        cls, model_fingerprint: str = "kimi-linear-48b-a3b", **kwargs: object
    ) -> CacheLayout:
        """The released 48B-A3B geometry: 27 layers, MLA at 1-based layers 4, 8, ..., 24, 27."""
        full = {4, 8, 12, 16, 20, 24, 27}
        kinds = ["mla" if i + 1 in full else "kda" for i in range(27)]
        return cls.kimi_linear(model_fingerprint, kinds, **kwargs)  # type: ignore[arg-type]
