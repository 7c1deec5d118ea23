"""The gated RMSNorm's kernels (kernels/gated_norm.py, via jaxlin.ops.norm.gated_rms_norm) against autodiff
of the XLA formula: interpret mode on CPU, compiled at GPT-2 Medium's shape with ``KERNELS_ON_GPU=1``; the
Triton lowering against an abstract H100 on any machine."""

import jax
import jax.numpy as jnp
import pytest

from jaxlin.ops import norm
from kernels import gated_norm
from tests.kernels.kernel_checks import ON_GPU, lower_triton_for_cuda, rel_error

SHAPE = (32, 1024, 16, 64) if ON_GPU else (2, 48, 4, 32)  # B, T, heads, values per head


def _inputs(dtype, gate_scale=1.0):
    keys = jax.random.split(jax.random.key(0), 4)
    x, dout = (jax.random.normal(k, SHAPE).astype(dtype) for k in keys[:2])
    g = (gate_scale * jax.random.normal(keys[2], SHAPE)).astype(dtype)
    w = jax.random.uniform(keys[3], SHAPE[-1:], jnp.float32, 0.5, 1.5)
    return x, g, w, dout


def _vjp(impl, x, g, w, dout):
    out, vjp = jax.vjp(lambda x, g, w: norm.gated_rms_norm(x, w, g, eps=1e-5, impl=impl), x, g, w)
    return (out, *vjp(dout))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gate_scale", [1.0, 40.0])  # 40: silu's derivative saturates
def test_value_and_gradients_match_autodiff(dtype, gate_scale):
    x, g, w, dout = _inputs(dtype, gate_scale)
    want = _vjp("xla", *(a.astype(jnp.float32) for a in (x, g, w, dout)))
    got = _vjp("pallas", x, g, w, dout)
    assert [a.dtype for a in got] == [dtype, dtype, dtype, jnp.float32]
    for a, b in zip(got, want):
        assert rel_error(a, b) < (1e-5 if dtype == jnp.float32 else 1e-2)


def test_rows_the_programs_do_not_divide_take_xla():
    assert not gated_norm.supports(jnp.ones((64, 48)))  # D not a power of two
    x = jax.random.normal(jax.random.key(1), (1, 3, 2, 32))  # 6 rows
    w = jnp.ones((32,))
    assert jnp.allclose(norm.gated_rms_norm(x, w, x, eps=1e-5, impl="pallas"),
                        norm.gated_rms_norm(x, w, x, eps=1e-5, impl="xla"))
    with pytest.raises(ValueError, match=f"multiple of {gated_norm.TILES.rows}"):
        gated_norm.gated_norm_forward(x.reshape(6, 32), x.reshape(6, 32), w, eps=1e-5, interpret=True)


def test_lowers_for_cuda_at_gpt2_medium_shape():
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    x, w = spec(32 * 1024 * 16, 64), spec(64, dtype=jnp.float32)
    both = lambda x, g, w, dout: (gated_norm.gated_norm_forward(x, g, w, eps=1e-5),
                                  gated_norm.gated_norm_backward(x, g, w, dout, eps=1e-5))
    text = lower_triton_for_cuda(both, x, x, w, x)
    assert "gated_norm_forward" in text and "gated_norm_backward" in text
