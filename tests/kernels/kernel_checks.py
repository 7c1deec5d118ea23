"""What the kernel tests share: where they run, tolerances, packed segments, gradients, errors.

On CPU the kernels run in interpret mode at tiny shapes. On a GPU the same checks run compiled at
full lengths: ``JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 python -m pytest tests/kernels -q``.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.mesh import AbstractDevice

ON_GPU = os.environ.get("KERNELS_ON_GPU") == "1"
LONG = 1000 if ON_GPU else 130
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}


def packed_segments(batch, T, boundaries):
    """[batch, T] ids with a new document at each boundary; the last row packs differently."""
    ids = np.zeros((batch, T), np.int32)
    for b in boundaries:
        if b < T:
            ids[:, b:] += 1
    ids[-1, T // 3:] += 5  # a different packing in the last row (same in a batch of one)
    return jnp.asarray(ids % 3)  # ids may repeat across non-adjacent segments


def value_and_grads(run, args, cot_key):
    """(o, final_state, *input gradients) of `run(*args) -> (o, final_state)` under random cotangents."""
    (o, s), vjp = jax.vjp(run, *args)
    ko, ks = jax.random.split(cot_key)
    do = jax.random.normal(ko, o.shape).astype(o.dtype)
    ds = jax.random.normal(ks, s.shape)
    return (o, s) + vjp((do, ds))


def rel_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def random_layer_norms(module, seed):
    """A copy of ``module`` whose LayerNorms are not the identity they start as (scales about 1 +- 0.3, biases
    about +-0.3), so that a check sees which LayerNorm a kernel used and how it rounded its parameters."""
    module = nnx.clone(module)
    norms = [m for _, m in nnx.iter_graph(module) if isinstance(m, nnx.LayerNorm)]
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(norms)))
    for ln in norms:
        ln.scale.set_value(1 + 0.3 * jax.random.normal(next(keys), ln.scale.shape))
        ln.bias.set_value(0.3 * jax.random.normal(next(keys), ln.bias.shape))
    return module


def lower_triton_for_cuda(f, *args):
    """The lowered text of ``jax.jit(f)`` for CUDA on any machine: the Triton lowering asks for a GPU, so an
    abstract H100 stands in for one."""
    h100 = AbstractDevice("NVIDIA H100 80GB HBM3", 132, "gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def fast_only_at(value, values):
    """Parameters for ``pytest.mark.parametrize``: ``value`` in the fast tier, the rest marked slow."""
    return [pytest.param(v, marks=() if v == value else pytest.mark.slow) for v in values]
