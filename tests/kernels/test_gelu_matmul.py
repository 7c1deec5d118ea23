"""The MLP's products with GELU in their epilogues (kernels/gelu_matmul.py) against float32 math.

Interpret mode on CPU at small shapes; compiled at the GPT-2 Medium shape with ``KERNELS_ON_GPU=1``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import gelu_matmul as gm
from tests.kernels.kernel_checks import ON_GPU, rel_error

M, D = (32 * 1024, 1024) if ON_GPU else (384, 128)  # tokens, width (the hidden width is 4 D)


def _operands(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (M, D), jnp.bfloat16)
    w_fc = (jax.random.normal(keys[1], (D, 4 * D)) * D ** -0.5).astype(jnp.bfloat16)
    w_proj = (jax.random.normal(keys[2], (4 * D, D)) * (2 * D) ** -0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[3], (M, D), jnp.bfloat16)
    return x, w_fc, w_proj, dy


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def test_gelu_formulas_match_jax():
    h = jnp.linspace(-6.0, 6.0, 1001)
    np.testing.assert_allclose(gm.gelu(h), jax.nn.gelu(h, approximate=True), atol=1e-6)
    derivative = jax.vmap(jax.grad(lambda z: jax.nn.gelu(z, approximate=True)))(h)
    np.testing.assert_allclose(gm.gelu_derivative(h), derivative, atol=1e-5)


def test_forward_product_writes_h_and_gelu_h():
    x, w_fc, _, _ = _operands()
    h, a = gm.gelu_product(x, w_fc, interpret=not ON_GPU)
    h_ref = _f32(x) @ _f32(w_fc)
    assert h.dtype == a.dtype == jnp.bfloat16
    assert rel_error(h, h_ref) < 4e-3
    assert rel_error(a, jax.nn.gelu(h_ref, approximate=True)) < 4e-3


def test_backward_product_applies_gelu_derivative():
    x, w_fc, w_proj, dy = _operands(1)
    h = (_f32(x) @ _f32(w_fc)).astype(jnp.bfloat16)
    dh = gm.gelu_grad_product(dy, w_proj.T, h, interpret=not ON_GPU)
    ref = (_f32(dy) @ _f32(w_proj).T) * gm.gelu_derivative(_f32(h))
    assert dh.dtype == jnp.bfloat16
    assert rel_error(dh, ref) < 4e-3


@pytest.mark.slow
@pytest.mark.parametrize("tiles", [gm.Tiles(epilogue=(64, 32), slots=1), gm.Tiles(n=64, k=32, stages=4)],
                         ids=["narrow-sub-tiles-one-slot", "narrow-tiles-deep-ring"])
def test_other_tiles_give_the_same_products(tiles):
    # Several tiles per program (M = 4 row tiles over 2 programs in interpret mode), so that slots and
    # SMEM buffers are reused across tiles.
    x, w_fc, w_proj, dy = _operands(3)
    x, dy = jnp.concatenate([x, -x])[:512], jnp.concatenate([dy, dy[::-1]])[:512]
    h, a = gm.gelu_product(x, w_fc, interpret=not ON_GPU, tiles=tiles)
    h_ref = _f32(x) @ _f32(w_fc)
    assert rel_error(h, h_ref) < 4e-3
    assert rel_error(a, jax.nn.gelu(h_ref, approximate=True)) < 4e-3
    dh = gm.gelu_grad_product(dy, w_proj.T, h, interpret=not ON_GPU, tiles=tiles)
    assert rel_error(dh, (_f32(dy) @ _f32(w_proj).T) * gm.gelu_derivative(_f32(h))) < 4e-3


@pytest.mark.slow
def test_mlp_value_and_gradients_match_float32_autodiff():
    x, w_fc, w_proj, dy = _operands(2)
    mlp_ref = lambda x, w_fc, w_proj: jax.nn.gelu(x @ w_fc, approximate=True) @ w_proj
    y_ref, vjp_ref = jax.vjp(mlp_ref, _f32(x), _f32(w_fc), _f32(w_proj))
    y, vjp = jax.vjp(lambda *a: gm.gelu_mlp(*a, not ON_GPU), x, w_fc, w_proj)
    assert rel_error(y, y_ref) < 1e-2
    for name, got, want in zip(("dx", "dw_fc", "dw_proj"), vjp(dy), vjp_ref(_f32(dy))):
        assert got.dtype == jnp.bfloat16, name
        assert rel_error(got, want) < 1e-2, name


def _gpt2_medium_specs():
    """Shapes of x (or dy), w_fc (or w_proj^T) and h at GPT-2 Medium's micro-batch, for lowering only."""
    return tuple(jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in ((32768, 1024), (1024, 4096), (32768, 4096)))


def test_lowers_for_cuda_at_gpt2_medium_shape():
    # Mosaic GPU's lowering runs here without a GPU: it checks layouts and the SMEM budget of an H100/H200.
    x, w, h = _gpt2_medium_specs()
    both = lambda x, w, h: (gm.gelu_product(x, w), gm.gelu_grad_product(x, w, h))
    text = jax.jit(both).trace(x, w, h).lower(lowering_platforms=("cuda",)).as_text()
    assert "gelu_product_kernel" in text and "gelu_grad_product_kernel" in text


def test_a_ring_too_deep_for_smem_is_refused_when_lowered():
    x, w, h = _gpt2_medium_specs()
    grad = lambda dy, w_t, h: gm.gelu_grad_product(dy, w_t, h, tiles=gm.Tiles(stages=4))
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        jax.jit(grad).trace(x, w, h).lower(lowering_platforms=("cuda",))


def test_supports_and_shape_errors():
    x, w_fc, _, _ = _operands()
    assert gm.supports(x, w_fc)
    assert not gm.supports(x.astype(jnp.float32), w_fc.astype(jnp.float32))
    assert not gm.supports(x[:100], w_fc)  # tokens not a multiple of the 128-row tile
    with pytest.raises(ValueError, match="multiple of 128"):
        gm.gelu_product(x[:100], w_fc, interpret=True)
