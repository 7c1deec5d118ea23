"""A decoding step's LayerNorm and MLP in one kernel (kernels.decode_mlp) against the block's XLA formula:
interpret mode on CPU at a small width, compiled at GPT-2 Medium's with ``KERNELS_ON_GPU=1``; the Triton
lowering against an abstract H100 on any machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.layers import fp8
from jaxlin.model import MLP, layer_norm
from jaxlin.ops import dispatch
from kernels import decode_mlp
from tests.kernels.kernel_checks import ON_GPU, lower_triton_for_cuda, random_layer_norms

WIDTH = 1024 if ON_GPU else 64


def _mlp_and_norm(dtype, seed=0):
    rngs = nnx.Rngs(seed)
    mlp = MLP(WIDTH, out_std=0.02, dtype=dtype, rngs=rngs, impl="xla", decode_impl="pallas")
    return mlp, random_layer_norms(layer_norm(WIDTH, 1e-5, dtype, rngs), seed + 1)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_blocks_layer_norm_and_mlp(seed, dtype, tol):
    """A row far from zero mean and unit spread, where the LayerNorm's statistics matter. In bf16 a hidden unit
    rounded the other way moves an output by about one of its ulps (up to 3 % of the outputs' spread)."""
    mlp, ln = _mlp_and_norm(dtype, seed)
    x = (5 + 3 * jax.random.normal(jax.random.key(seed + 7), (1, 1, WIDTH))).astype(dtype)
    with jax.default_matmul_precision("float32"):  # a GPU's default TF32 would round XLA's products
        want = mlp(ln(x))
        got = mlp.decode(x, ln)
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(jnp.std(want.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(got, np.float32) / scale, np.asarray(want, np.float32) / scale,
                               atol=tol, rtol=0)


def _rounded_like_the_kernel(mlp, ln, x):
    """The kernel's formula in jnp, rounding where it does (the LayerNorm's parameters, its output, c_fc's
    and GELU's outputs in the compute dtype)."""
    f32, dtype = jnp.float32, mlp.c_fc.dtype
    rounded = lambda v: v.astype(dtype).astype(f32)
    x = x[:, 0].astype(f32)
    mean = x.mean(-1, keepdims=True)
    variance = jnp.maximum((x * x).mean(-1, keepdims=True) - mean * mean, 0.0)
    scale, bias = rounded(ln.scale[...]), rounded(ln.bias[...])
    normed = rounded((x - mean) * (jax.lax.rsqrt(variance + ln.epsilon) * scale) + bias)
    w_fc, w_proj = (layer.kernel[...].astype(dtype).astype(f32) for layer in (mlp.c_fc, mlp.c_proj))
    hidden = rounded(jax.nn.gelu(rounded(normed @ w_fc), approximate=True))
    return (hidden @ w_proj).astype(dtype)[:, None]


def test_rounds_where_the_block_does():
    """In bf16, against the same formula in jnp with the same rounding points: tight, where rounding one of
    them differently (or the LayerNorm's float32 parameters) moves the outputs by about 1.5 % of their
    spread."""
    mlp, ln = _mlp_and_norm(jnp.bfloat16, seed=2)
    x = (5 + 3 * jax.random.normal(jax.random.key(3), (1, 1, WIDTH))).astype(jnp.bfloat16)
    with jax.default_matmul_precision("float32"):
        want, got = _rounded_like_the_kernel(mlp, ln, x), mlp.decode(x, ln)
    scale = float(jnp.std(want.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(got, np.float32) / scale, np.asarray(want, np.float32) / scale,
                               atol=3e-3, rtol=0)


def test_which_calls_take_the_kernel(monkeypatch):
    mlp, _ = _mlp_and_norm(jnp.float32)
    step, prompt = jnp.zeros((1, 1, WIDTH)), jnp.zeros((1, 5, WIDTH))
    assert mlp.decodes_in_kernel(step, decoding=True)
    assert not mlp.decodes_in_kernel(prompt, decoding=True)  # a prompt's rows belong on tensor cores
    assert not mlp.decodes_in_kernel(step, decoding=False)  # a forward pass without state
    assert not mlp.decodes_in_kernel(jnp.zeros((2, 1, WIDTH)), decoding=True)  # XLA's GEMMs from two rows
    fp8_mlp, _ = _mlp_and_norm(jnp.float32)
    fp8.use_fp8(fp8_mlp, 4)
    assert not fp8_mlp.decodes_in_kernel(step, decoding=True)  # no FP8 path
    applies = lambda impl: dispatch.decode_mlp_applies(impl, step, mlp.c_fc.out_features, decoding=True)
    assert not applies("xla")
    assert applies("auto") == (jax.default_backend() == "gpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # a GPU stand-in
    assert applies("auto")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):  # several devices: XLA's
        assert not applies("auto")
        with pytest.raises(ValueError, match="one device only"):
            applies("pallas")


def test_refuses_what_it_does_not_support():
    x, w = jnp.zeros((1, 96)), jnp.zeros((384, 96))
    assert not decode_mlp.supports(x, 384) and not decode_mlp.supports(jnp.zeros((2, 64)), 256)
    assert not decode_mlp.supports(jnp.zeros((1, 2 * decode_mlp.MAX_WIDTH)), 4 * 2 * decode_mlp.MAX_WIDTH)
    with pytest.raises(ValueError, match="one row, a power-of-two width up to"):
        decode_mlp.decode_mlp(x, jnp.ones(96), jnp.zeros(96), w, w, eps=1e-5)


def test_lowers_for_an_h100_at_gpt2_medium_width():
    """One row, bf16 weights, 4,096 hidden units."""
    spec = jax.ShapeDtypeStruct
    args = (spec((1, 1024), jnp.bfloat16), spec((1024,), jnp.float32), spec((1024,), jnp.float32),
            spec((4096, 1024), jnp.bfloat16), spec((4096, 1024), jnp.bfloat16))
    text = lower_triton_for_cuda(lambda *a: decode_mlp.decode_mlp(*a, eps=1e-5), *args)
    assert "decode_mlp" in text
