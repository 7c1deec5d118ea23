"""Under a 2-device mesh the Pallas GLA kernel runs per batch shard (shard_map) and matches the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlin import ops

pytestmark = pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py emulates them)")


@pytest.mark.slow
def test_sharded_pallas_gla_matches_reference():
    B, T, H, K, V = 2, 20, 1, 32, 32
    keys = jax.random.split(jax.random.key(0), 5)
    q, k = (jax.random.normal(keys[i], (B, T, H, K)) for i in range(2))
    v = jax.random.normal(keys[2], (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K)))
    h0 = jax.random.normal(keys[4], (B, H, K, V))
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def loss(impl, q, k, v, g, h0):
        o, s = ops.gla(q, k, v, g, initial_state=h0, output_final_state=True, impl=impl)
        return jnp.sum(o * o) + jnp.sum(jnp.sin(s)), (o, s)

    args = jax.device_put((q, k, v, g, h0), NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        (_, (o, s)), grads = jax.jit(jax.value_and_grad(lambda *a: loss("pallas", *a), argnums=range(5),
                                                        has_aux=True))(*args)
        lowered = jax.jit(lambda *a: loss("pallas", *a)[0]).lower(*args).as_text()
    assert "shard_map" in lowered or "sdy.manual_computation" in lowered
    (_, (o_ref, s_ref)), grads_ref = jax.value_and_grad(lambda *a: loss("reference", *a), argnums=range(5),
                                                        has_aux=True)(q, k, v, g, h0)
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    assert o.sharding.spec == P("data")
