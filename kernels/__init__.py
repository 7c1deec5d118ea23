"""Pallas GPU kernels for jaxlin's ops: Mosaic GPU (Hopper) and Triton lowerings.

Kernels import only jax; ``jaxlin.ops.dispatch`` decides which of them run. Their benchmarks live in
``jaxlin.bench``.
"""
