"""A decoding step's LayerNorm inside its product (kernels.norm_product) against Flax's LayerNorm then the
product: interpret mode on CPU at small widths, compiled at GPT-2 Medium's with ``KERNELS_ON_GPU=1``; the
Triton lowering against an abstract H100 on any machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.ops import dispatch
from kernels import norm_product
from tests.kernels.kernel_checks import ON_GPU, lower_triton_for_cuda

WIDTH, COLUMNS = (1024, 3088) if ON_GPU else (128, 208)  # GLA's joined q|k|v|gate-rank|g: 16 columns over 32s


def _inputs(rows, dtype, seed, with_delta, columns=COLUMNS):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = (2.0 + 3.0 * jax.random.normal(keys[0], (rows, WIDTH))).astype(dtype)  # far from zero mean and unit std
    delta = jax.random.normal(keys[1], (rows, WIDTH)).astype(dtype) if with_delta else None
    scale = 1.0 + 0.1 * jax.random.normal(keys[2], (WIDTH,))
    bias = 0.1 * jax.random.normal(keys[3], (WIDTH,))
    w = (WIDTH ** -0.5 * jax.random.normal(keys[4], (WIDTH, columns))).astype(dtype)
    return x, delta, scale, bias, w


def _flax(x, delta, scale, bias, w, gelu):
    """The XLA decoding step's way: the residual add, Flax's LayerNorm, the product, the activation."""
    s = x if delta is None else x + delta
    ln = nnx.LayerNorm(WIDTH, epsilon=1e-5, dtype=x.dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ln.scale.set_value(scale)
    ln.bias.set_value(bias)
    y = jnp.dot(ln(s), w, preferred_element_type=jnp.float32).astype(x.dtype)
    return s, jax.nn.gelu(y, approximate=True) if gelu else y


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 0.04)])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("with_delta,gelu", [(False, False), (True, True)])
def test_matches_the_layer_norm_then_the_product(rows, dtype, tol, with_delta, gelu):
    """bf16: the normed rows round to bf16 on both paths and may differ by an ulp, so the products' sums
    (about 1 in size) by a few bf16 ulps."""
    args = _inputs(rows, dtype, seed=rows, with_delta=with_delta)
    with jax.default_matmul_precision("float32"):
        s, y = norm_product.norm_product(*args, eps=1e-5, gelu=gelu, interpret=not ON_GPU)
        want_s, want_y = _flax(*args, gelu)
    if with_delta:
        np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(want_s, np.float32))
    else:
        assert s is None
    assert y.dtype == dtype and y.shape == (rows, COLUMNS)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want_y, np.float32), atol=tol, rtol=tol)


def test_refuses_what_it_does_not_support():
    x, _, scale, bias, w = _inputs(9, jnp.float32, seed=0, with_delta=False)
    with pytest.raises(ValueError, match="B <= 8"):
        norm_product.norm_product(x, None, scale, bias, w, eps=1e-5, interpret=True)
    assert not norm_product.supports(x, w) and norm_product.supports(x[:8], w) and norm_product.supports(x[:1], w)
    assert not norm_product.supports(x[:2], w[:, :40])  # columns not a whole number of 16
    assert not norm_product.supports(x[:2, :96], w[:96])  # rows not whole slices of a power of two


@pytest.mark.parametrize("rows,columns,gelu", [(2, 3088, False), (8, 4096, True)])
def test_lowers_for_an_h100_at_gpt2_medium_width(rows, columns, gelu):
    """A lone prompt's two rows into GLA's joined product (16-column tiles); 8 rows into the MLP's first
    product (GELU)."""
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    args = (spec(rows, 1024), spec(rows, 1024), spec(1024, dtype=jnp.float32), spec(1024, dtype=jnp.float32),
            spec(1024, columns))
    text = lower_triton_for_cuda(lambda *a: norm_product.norm_product(*a, eps=1e-5, gelu=gelu), *args)
    assert ("norm_gelu_product" if gelu else "norm_product") in text


def test_which_calls_take_the_kernel():
    """The model's layer_norm_impl: "pallas" anywhere, "auto" on one GPU, "xla" never; rows it supports."""
    x, _, _, _, w = _inputs(2, jnp.float32, seed=0, with_delta=False)
    assert dispatch.norm_product_applies("pallas", x, w) and not dispatch.norm_product_applies("xla", x, w)
    assert dispatch.norm_product_applies("auto", x, w) == (jax.default_backend() == "gpu")
    assert not dispatch.norm_product_applies("pallas", jnp.concatenate([x] * 5), w)  # 10 rows
    with pytest.raises(ValueError, match="layer_norm_impl"):
        dispatch.norm_product_applies("triton", x, w)
