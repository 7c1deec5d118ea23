"""Context-parallel GLA (sequences split over the `sequence` mesh axis) against the single-device op.

2 devices run here (tests/conftest.py emulates them); 4 in a process of their own (the device count is fixed
when JAX starts).
"""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlin import ops
from jaxlin.train import collectives

REPO = Path(__file__).resolve().parents[2]
B, H, K, V = 2, 2, 16, 16


def inputs(n, slice_len=40, seed=0):
    """Random GLA inputs of n slices; row 0's documents start inside slice 0, at the first token of slice 1
    and inside the last slice, row 1 is one document (the state crosses every boundary); some gates extreme."""
    T = n * slice_len
    keys = jax.random.split(jax.random.key(seed), 6)
    q, k = (jax.random.normal(keys[i], (B, T, H, K)) for i in range(2))
    v = jax.random.normal(keys[2], (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K)) + 3.0)
    g = jnp.where(jax.random.uniform(keys[4], g.shape) < 0.02, -30.0, g)
    h0 = jax.random.normal(keys[5], (B, H, K, V))
    starts = np.zeros((B, T), np.int32)
    starts[0, [slice_len // 2, slice_len, T - slice_len // 3]] = 1
    return q, k, v, g, h0, jnp.asarray(np.cumsum(starts, axis=1))


def loss(impl, q, k, v, g, h0, segment_ids):
    o, s = ops.gla(q, k, v, g, initial_state=h0, output_final_state=True, segment_ids=segment_ids, impl=impl)
    w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
    return jnp.sum(o * w) + jnp.sum(jnp.sin(s)), (o, s)


def sequence_mesh(n):
    return jax.make_mesh((n,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def compare(n):
    """With documents and an initial state (both implementations on each slice), and without either."""
    grad = jax.value_and_grad(loss, argnums=range(1, 6), has_aux=True)
    mesh = sequence_mesh(n)
    specs = (P(None, "sequence"),) * 4 + (P(), P(None, "sequence"))
    full = inputs(n)
    for args, impls in ((full, ("chunked", "reference")), (full[:4] + (None, None), ("chunked",))):
        (_, (o_ref, s_ref)), grads_ref = jax.jit(grad, static_argnums=0)("reference", *args)
        sharded = [None if a is None else jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
        with jax.set_mesh(mesh):
            for impl in impls:
                (_, (o, s)), grads = jax.jit(grad, static_argnums=0)(impl, *sharded)
                np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-4)
                for name, a, b in zip("q k v g h0".split(), grads, grads_ref):
                    if b is not None:
                        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3, err_msg=f"d{name} ({impl})")


def collective_bytes(n, slice_len):
    """(kind, bytes, executions) of the compiled forward and backward at sequence length n x slice_len."""
    args = inputs(n, slice_len)
    mesh = sequence_mesh(n)
    specs = (P(None, "sequence"),) * 4 + (P(), P(None, "sequence"))
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(lambda *a: loss("chunked", *a)[0], argnums=range(5))).lower(*shapes).compile().as_text()
    return Counter((c.kind, c.bytes, c.count) for c in collectives.parse_hlo(text))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py emulates them)")
@pytest.mark.slow
def test_two_devices_match_the_single_device_op():
    compare(2)


@pytest.mark.slow
def test_four_devices_match_the_single_device_op():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", "from tests.ops.test_context_parallel import compare; compare(4)"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py emulates them)")
@pytest.mark.slow
def test_devices_exchange_states_only():
    short, long = collective_bytes(2, 64), collective_bytes(2, 256)
    assert short == long, "collectives grow with the sequence length"
    state = B * H * K * V * 4
    assert all(bytes <= 2 * state for (_, bytes, _) in short), short


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py emulates them)")
def test_short_conv_takes_the_previous_slice_as_halo():
    """The short conv with its time axis split: the previous slice's last inputs arrive by ppermute, and a
    document starting at a slice's first token or just after it reads none of them."""
    from jaxlin.ops import conv

    T, C, width = 24, 8, 4
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (B, T, C))
    kernel = jax.random.normal(keys[1], (width, C))
    starts = np.zeros((B, T), np.int32)
    starts[0, [T // 2, 5]] = 1  # at the second slice's first token
    starts[1, T // 2 + 1] = 1  # one token into the second slice
    segment_ids = jnp.asarray(np.cumsum(starts, axis=1))
    w = jnp.cos(jnp.arange(B * T * C, dtype=jnp.float32).reshape(B, T, C))

    def f(x, kernel, segment_ids):
        y, _ = conv.causal_conv(x, kernel, segment_ids=segment_ids)
        return jnp.sum(y * w), y

    grad = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    for ids in (None, segment_ids):
        (_, y_ref), grads_ref = jax.jit(grad)(x, kernel, ids)
        mesh = sequence_mesh(2)
        with jax.set_mesh(mesh):
            split = NamedSharding(mesh, P(None, "sequence"))
            (_, y), grads = jax.jit(grad)(jax.device_put(x, split), kernel,
                                          None if ids is None else jax.device_put(ids, split))
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, grads_ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
