import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlin.train.optimizer import clip_and_skip_nonfinite


def tree(key):
    a, b = jax.random.split(key)
    return {"w": jax.random.normal(a, (8, 4)), "b": jax.random.normal(b, (4,))}


def test_matches_optax_clip_inside_apply_if_finite():
    inner = optax.adamw(1e-2, weight_decay=0.1)
    ours = clip_and_skip_nonfinite(inner, max_norm=1.0)
    theirs = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), inner), 10)
    params = tree(jax.random.key(0))
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for step, scale in enumerate([10.0, 0.1, jnp.nan, 3.0]):  # clipped, unclipped, skipped, clipped
        grads = jax.tree.map(lambda g: g * scale, tree(jax.random.key(step + 1)))
        u_ours, s_ours = ours.update(grads, s_ours, params)
        u_theirs, s_theirs = theirs.update(grads, s_theirs, params)
        for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
        assert int(s_ours.notfinite_count) == int(s_theirs.notfinite_count)
        assert int(s_ours.total_notfinite) == int(s_theirs.total_notfinite)
        np.testing.assert_allclose(s_ours.grad_norm, optax.tree.norm(grads), rtol=1e-6)
        params = optax.apply_updates(params, u_ours)
    assert int(s_ours.total_notfinite) == 1 and int(s_ours.notfinite_count) == 0


def test_one_reduction_per_gradient():
    """The norm, the skip decision and the logged norm share one reduction of each gradient."""
    ours = clip_and_skip_nonfinite(optax.adamw(1e-2), max_norm=1.0)
    params = tree(jax.random.key(0))
    hlo = jax.jit(ours.update).lower(params, ours.init(params), params).as_text()
    assert hlo.count("stablehlo.reduce") == len(jax.tree.leaves(params))
