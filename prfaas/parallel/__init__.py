"""Tensor (and expert) parallelism: one engine over ``tensor_parallel_size`` ranks, one process each.

* :mod:`prfaas.parallel.group`: the ranks' process group (gloo on the CPU, NCCL on CUDA) and the
  collectives the model calls;
* :mod:`prfaas.parallel.shard`: which slice of each parameter and of the KV a rank holds;
* :mod:`prfaas.parallel.layers`: row-parallel linear layers and the expert-parallel MoE;
* :mod:`prfaas.parallel.weights`: a rank's weights (random presets: the same model for any size);
* :mod:`prfaas.parallel.runtime` / :mod:`prfaas.parallel.worker`: rank 0 (the engine's process)
  and the worker ranks it spawns.

docs/tensor_parallel.md describes the design.
"""
