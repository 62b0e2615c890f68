"""Tensor (and expert) parallelism: one engine over ``tensor_parallel_size`` ranks, one process each.

* :mod:`prfaas.model.tp.group`: the ranks' process group (gloo on the CPU, NCCL on CUDA) and the
  collectives the model calls;
* :mod:`prfaas.model.tp.shard`: which slice of each parameter and of the KV a rank holds;
* :mod:`prfaas.model.tp.layers`: row-parallel linear layers and the expert-parallel MoE;
* :mod:`prfaas.model.tp.weights`: a rank's weights (random presets: the same model for any size);
* :mod:`prfaas.engine.tp_runtime` / :mod:`prfaas.engine.tp_worker`: rank 0 (the engine's process)
  and the worker ranks it spawns.

docs/tensor_parallel.md describes the design.
"""
