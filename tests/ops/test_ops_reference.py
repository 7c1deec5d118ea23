"""The oracle itself: jaxlin.ops.reference against a plain float64 numpy loop written from the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin import ops
from jaxlin.ops import reference

B, T, H, K, V = 2, 9, 2, 16, 24
SCALE = 0.3
# row 1 returns to an earlier id: a restart is a change from the previous token, not a new id
SEGMENTS = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 3, 3, 3, 3, 5, 5, 7]], np.int32)


def numpy_loop(op, q, k, v, g, beta, s0, seg):
    o = np.zeros((B, T, H, V))
    S_final = np.zeros((B, H, K, V))
    for b in range(B):
        for h in range(H):
            S = s0[b, h].copy()
            for t in range(T):
                if t > 0 and seg[b, t] != seg[b, t - 1]:
                    S = np.zeros((K, V))
                if op == "gla":
                    S = np.exp(g[b, t, h])[:, None] * S + np.outer(k[b, t, h], v[b, t, h])
                else:
                    if op == "gated_delta_rule":
                        S = np.exp(g[b, t, h]) * S
                    u = beta[b, t, h] * (v[b, t, h] - S.T @ k[b, t, h])
                    S = S + np.outer(k[b, t, h], u)
                o[b, t, h] = SCALE * S.T @ q[b, t, h]
            S_final[b, h] = S
    return o, S_final


@pytest.mark.parametrize("op", ["gla", "delta_rule", "gated_delta_rule"])
def test_reference_matches_numpy_loop(op):
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V))
    g = -rng.uniform(0.0, 2.0, (B, T, H, K) if op == "gla" else (B, T, H))
    beta = rng.uniform(0.0, 1.0, (B, T, H))
    s0 = rng.standard_normal((B, H, K, V))
    want_o, want_s = numpy_loop(op, q, k, v, g, beta, s0, SEGMENTS)

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    fn = getattr(reference, f"{op}_reference")
    gates = {"gla": (g,), "delta_rule": (beta,), "gated_delta_rule": (g, beta)}[op]
    o, S = fn(f32(q), f32(k), f32(v), *map(f32, gates), scale=SCALE, initial_state=f32(s0),
              output_final_state=True, segment_ids=jnp.asarray(SEGMENTS))
    np.testing.assert_allclose(np.asarray(o), want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(S), want_s, rtol=1e-5, atol=1e-5)


def test_qk_l2norm_normalises_before_everything():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 5, 1, 16)), jnp.float32) for _ in range(3))
    beta = jnp.asarray(rng.uniform(size=(1, 5, 1)), jnp.float32)
    unit = lambda x: x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)
    o, _ = ops.delta_rule(q, k, v, beta, use_qk_l2norm=True, impl="reference")
    want, _ = ops.delta_rule(unit(q), unit(k), v, beta, impl="reference")
    np.testing.assert_allclose(np.asarray(o), np.asarray(want), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda q, k: ops.delta_rule(q, k, v, beta, use_qk_l2norm=True, impl="reference")[0].sum(),
                     argnums=(0, 1))(q, k)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in grads)
