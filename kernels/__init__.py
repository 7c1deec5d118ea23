"""Pallas GPU kernels for jaxlin's linear-attention ops.

Kernels import only jax; ``jaxlin.ops`` dispatches to them lazily (``impl="pallas"``).
``kernels.bench`` is the timing tool and may import jaxlin.
"""
