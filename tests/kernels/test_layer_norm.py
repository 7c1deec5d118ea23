"""The LayerNorm kernels with the residual stream (kernels/layer_norm.py, via
jaxlin.ops.norm.residual_layer_norm) against autodiff of the residual add and a LayerNorm (Flax's, or the
centred-variance formula where a large mean makes Flax's one-pass variance inexact): interpret
mode on CPU, compiled at GPT-2 Medium's shape with ``KERNELS_ON_GPU=1``; the Triton lowering against an
abstract H100 on any machine."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxlin.ops import norm
from kernels import layer_norm
from tests.kernels.kernel_checks import ON_GPU, lower_triton_for_cuda, rel_error

SHAPE = (32, 1024, 1024) if ON_GPU else (2, 64, 64)  # B, T, D


def _inputs(dtype, offset=0.0):
    keys = jax.random.split(jax.random.key(0), 6)
    x, r, dsum, dout = (jax.random.normal(k, SHAPE).astype(dtype) for k in keys[:4])
    ln = nnx.LayerNorm(SHAPE[-1], epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ln.scale[...] = jax.random.uniform(keys[4], SHAPE[-1:], minval=0.5, maxval=1.5)
    ln.bias[...] = 0.1 * jax.random.normal(keys[5], SHAPE[-1:])
    return (x + offset).astype(dtype), r, dsum, dout, ln


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("offset", [0.0, 30.0])  # 30: a large mean, where the variance must be centred
def test_sum_norm_and_gradients_match_flax(dtype, with_residual, offset):
    x, r, dsum, dout, ln = _inputs(dtype, offset)
    r = r if with_residual else None

    def flax_path(x, r, scale, bias):
        s = (x if r is None else x + r).astype(jnp.float32)  # the sum rounded to its dtype, as the model's
        return s, (_flax_norm(ln, s, scale, bias) if offset == 0.0 else _centred_norm(s, scale, bias))

    def kernel_path(x, r, scale, bias):
        return norm.residual_layer_norm(x, r, scale, bias, eps=1e-5)

    def value_and_grads(f):
        out, vjp = jax.vjp(f, x, r, ln.scale[...], ln.bias[...])
        return out, vjp(tuple(g.astype(o.dtype) for g, o in zip((dsum, dout), out)))

    (want_out, want_grads), (out, grads) = value_and_grads(flax_path), value_and_grads(kernel_path)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for got, want in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((want_out, want_grads))):
        assert rel_error(got, want) < tol


def _flax_norm(ln, s, scale, bias):
    """Flax's LayerNorm of s with the given parameters (float32 compute, for the reference)."""
    model = nnx.LayerNorm(s.shape[-1], epsilon=ln.epsilon, dtype=s.dtype, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(0))
    model.scale[...], model.bias[...] = scale, bias
    return model(s)


def _centred_norm(s, scale, bias):
    centred = s - jnp.mean(s, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + 1e-5) * scale + bias


def test_shapes_the_programs_do_not_cover_are_refused():
    x = jnp.ones((48, 64))
    assert not layer_norm.supports(x) and not layer_norm.supports(jnp.ones((64, 96)))
    with pytest.raises(ValueError, match="multiple of 64"):
        layer_norm.layer_norm_forward(x, None, jnp.ones(64), jnp.zeros(64), eps=1e-5, interpret=True)


def test_lowers_for_cuda_at_gpt2_medium_shape():
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    x, w = spec(32 * 1024, 1024), spec(1024, dtype=jnp.float32)
    both = lambda x, r, s, b, dsum, dout: (layer_norm.layer_norm_forward(x, r, s, b, eps=1e-5),
                                           layer_norm.layer_norm_backward(x, r, s, dsum, dout, eps=1e-5))
    text = lower_triton_for_cuda(both, x, x, w, w, x, x)
    assert "layer_norm_forward" in text and "layer_norm_backward" in text
