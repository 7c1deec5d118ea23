import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin.train.loss import chunked_cross_entropy


def full_cross_entropy(hidden, embedding, targets):
    logits = jnp.einsum("btd,vd->btv", hidden.astype(jnp.float32), embedding.astype(jnp.float32))
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def inputs(dtype, B=3, T=7, D=16, V=50):
    kh, kw, ky = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(kh, (B, T, D), jnp.float32).astype(dtype)
    embedding = jax.random.normal(kw, (V, D), jnp.float32)
    return hidden, embedding, jax.random.randint(ky, (B, T), 0, V)


@pytest.mark.parametrize("chunk", [4, 21, 64])  # padded last slice, exact slices, one slice
def test_loss_and_gradients_match_full_logits_f32(chunk):
    hidden, embedding, targets = inputs(jnp.float32)
    loss_fn = lambda h, w: chunked_cross_entropy(h, w, targets, chunk=chunk)
    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(hidden, embedding)
    want, want_grads = jax.value_and_grad(full_cross_entropy, argnums=(0, 1))(hidden, embedding, targets)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(loss_fn)(hidden, embedding), want, rtol=1e-6)  # primal path
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_bf16_hidden_gets_bf16_gradient_and_float32_embedding_gradient():
    hidden, embedding, targets = inputs(jnp.bfloat16)
    scaled = lambda h, w: 3.0 * chunked_cross_entropy(h, w, targets, chunk=8)  # a non-unit cotangent
    dh, dw = jax.grad(scaled, argnums=(0, 1))(hidden, embedding)
    want_dh, want_dw = jax.grad(lambda h, w: 3.0 * full_cross_entropy(h, w, targets), argnums=(0, 1))(
        hidden.astype(jnp.float32), embedding.astype(jnp.bfloat16).astype(jnp.float32))
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dh, np.float32), want_dh, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(dw, want_dw, rtol=2e-2, atol=2e-3)


def test_under_a_two_device_mesh_matches_one_device():
    """Each device loops over its own rows; the embedding gradient is summed over devices once."""
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (tests/conftest.py emulates them on CPU)")
    hidden, embedding, targets = inputs(jnp.float32, B=4)
    loss_fn = lambda h, w: chunked_cross_entropy(h, w, targets, chunk=8)
    want, want_grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(hidden, embedding)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        h, y = jax.device_put(hidden, rows), jax.device_put(targets, rows)
        fn = jax.jit(jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, y, chunk=8), argnums=(0, 1)))
        loss, grads = fn(h, embedding)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
