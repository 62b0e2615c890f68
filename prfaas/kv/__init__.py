"""What crosses the wire between a prefill and a decode node, independent of how it travels.

* ``unit``: the export/import unit (``TransferHeader``, ``LayerPart``, ``KVExport``);
* ``layout``: ``CacheLayout``, the per-layer tensor specs of a node's cache, made by the cache
  (``HybridCache.layout``) and checked by the receiver before it allocates anything;
* ``streaming``: ``LayerStreamer``, layer-wise sending from a prefill engine (engine and sender seen
  through small protocols, so neither ``prfaas.transfer`` nor this package imports the engine);
* ``synthetic``: random exports of a layout, for tests and benchmarks.
"""

from prfaas.kv.layout import TOKENS, CacheLayout, TensorSpec
from prfaas.kv.unit import KVExport, LayerPart, TransferHeader

__all__ = ["TOKENS", "CacheLayout", "KVExport", "LayerPart", "TensorSpec", "TransferHeader"]
