"""GLA Pallas kernels vs the token-scan reference: outputs, final states and all gradients.

On CPU the kernels run in interpret mode at tiny shapes. On a GPU run the same checks
compiled, at full lengths:
``JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 python -m pytest tests/kernels -q``.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxlin.ops.dispatch import pallas_backend
from jaxlin.ops.reference import gla_reference
from kernels.gla import gla_pallas, mosaic_backward, mosaic_supports, supports
from tests.kernels.kernel_checks import LONG, ON_GPU, TOL, fast_only_at, packed_segments, rel_error, value_and_grads

BATCH, HEADS = (2, 4) if ON_GPU else (1, 1)
LENGTHS = (1, 63, 64, 65, 1000, 4096) if ON_GPU else (1, 63, 64, 65)  # 130 below


def _inputs(seed, T, K, V, dtype, gate_scale):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    shape = (BATCH, T, HEADS)
    q = jax.random.normal(keys[0], shape + (K,))
    k = jax.random.normal(keys[1], shape + (K,))
    v = jax.random.normal(keys[2], shape + (V,))
    # Per-channel gates spread over decades: from ~-1e-3 (near 0) to ~-gate_scale.
    spread = jnp.logspace(-3, 0, K) * gate_scale
    g = -jax.random.uniform(keys[3], shape + (K,), minval=0.5, maxval=1.5) * spread
    h0 = jax.random.normal(keys[4], (BATCH, HEADS, K, V))
    cast = lambda x: x.astype(dtype)
    return cast(q), cast(k), cast(v), cast(g), h0, keys[5]


def _outputs_and_grads(fn, q, k, v, g, h0, cot_key, segment_ids, use_h0):
    def run(q, k, v, g, h0):
        return fn(q, k, v, g, scale=q.shape[-1] ** -0.5, initial_state=h0 if use_h0 else None,
                  output_final_state=True, segment_ids=segment_ids)

    return value_and_grads(run, (q, k, v, g, h0), cot_key)


def _check(T, K=32, V=64, dtype=jnp.float32, gate_scale=1.0, segments=None, use_h0=True, seed=0,
           backend=None):
    """``backend`` None: the one ``impl="pallas"`` takes for these inputs."""
    q, k, v, g, h0, cot_key = _inputs(seed, T, K, V, dtype, gate_scale)
    seg = None if segments is None else packed_segments(BATCH, T, segments)
    backend = backend or pallas_backend("gla", (q, k, v, g))
    pallas = lambda *a, **kw: gla_pallas(*a, **kw, interpret=not ON_GPU, backend=backend)
    got = jax.jit(lambda *a: _outputs_and_grads(pallas, *a, seg, use_h0))(q, k, v, g, h0, cot_key)
    want = jax.jit(lambda *a: _outputs_and_grads(gla_reference, *a, seg, use_h0))(q, k, v, g, h0, cot_key)
    names = ["o", "final_state", "dq", "dk", "dv", "dg"] + (["dh0"] if use_h0 else [])
    errors = {n: rel_error(x, y) for n, x, y in zip(names, got, want)}
    assert got[0].dtype == v.dtype and got[0].shape == v.shape
    assert got[1].dtype == jnp.float32 and got[1].shape == h0.shape
    bad = {n: e for n, e in errors.items() if not e <= TOL[dtype]}
    assert not bad, f"relative errors over {TOL[dtype]}: {bad} (all: {errors})"


# Gates of about -0.1 per token take the whole-chunk form, -1 the sub-chunk form (kernels.common).
@pytest.mark.parametrize("T", fast_only_at(65, LENGTHS))
def test_lengths_f32(T):
    _check(T, gate_scale=0.1)


@pytest.mark.slow
def test_packed_segments_f32():
    # resets mid-sub-chunk, on a chunk boundary, one token after it, and a one-token segment
    _check(LONG, segments=(5, 64, 65, 66, 100), seed=1)
    _check(LONG, gate_scale=0.1, segments=(5, 64, 65, 66, 100), seed=1)


@pytest.mark.slow
def test_gates_below_minus_20_f32():
    # the fastest channels decay by e^-30 per token: any unreferenced exponent overflows
    _check(LONG, gate_scale=30.0, segments=(70,), seed=2)


# gates of up to -1 a token leave no chunk mild, so the Mosaic case needs smaller ones to reach its backward
@pytest.mark.slow
@pytest.mark.parametrize("backend,gate_scale", [("mosaic", 0.1), ("triton", 1.0)])
def test_bf16_segments(backend, gate_scale):
    _check(LONG, dtype=jnp.bfloat16, gate_scale=gate_scale, segments=(17, 64), seed=3, backend=backend)


# The fused Mosaic GPU kernels (bf16 only).
@pytest.mark.parametrize("T", fast_only_at(65, LENGTHS))
def test_mosaic_lengths(T):
    _check(T, dtype=jnp.bfloat16, gate_scale=0.1, backend="mosaic")


@pytest.mark.slow
def test_mosaic_gates_below_minus_20():
    # strongly decaying chunks: the forward's key-by-key form and the Triton backward; a reset mid-chunk
    _check(LONG, dtype=jnp.bfloat16, gate_scale=30.0, segments=(70,), seed=2, backend="mosaic")


@pytest.mark.slow
@pytest.mark.parametrize("K,V", [(32, 128), (64, 64)])  # (64, 64): the Triton backward
def test_mosaic_head_dims_no_initial_state(K, V):
    _check(LONG if ON_GPU else 64, K=K, V=V, dtype=jnp.bfloat16, gate_scale=0.1, use_h0=False, seed=6,
           backend="mosaic")


def test_mosaic_backward_fits_shared_memory():
    assert [mosaic_backward.supports(K, V) for K, V in [(32, 64), (64, 64), (32, 128), (64, 128)]] == [
        True, False, True, False]
    assert mosaic_backward.smem_bytes(32, 64) <= mosaic_backward.TWO_PER_SM  # the reference heads: 2 per SM
    g = jnp.full((1, 128, 1, 4), -0.5)
    assert bool(mosaic_backward.all_chunks_mild(g))
    assert not bool(mosaic_backward.all_chunks_mild(g.at[0, 64:, 0, 2].set(-0.7)))


def test_mosaic_refuses_what_it_cannot_run():
    x = lambda d, dt=jnp.bfloat16: jnp.ones((1, 8, 1, d), dt)
    assert mosaic_supports(x(32), x(32), x(64), x(32)) and not mosaic_supports(x(32), x(32), x(32), x(32))
    assert not mosaic_supports(x(32), x(32), x(64), x(32, jnp.float32))
    with pytest.raises(ValueError, match="backend='mosaic' needs bf16"):
        gla_pallas(x(32), x(32), x(32), -x(32), scale=1.0, initial_state=None, output_final_state=False,
                   segment_ids=None, backend="mosaic")
    with pytest.raises(ValueError, match="expected one of"):
        gla_pallas(x(32), x(32), x(64), -x(32), scale=1.0, initial_state=None, output_final_state=False,
                   segment_ids=None, backend="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("K,V", [(128, 32), (64, 128)])
def test_head_dims_bf16(K, V):
    _check(64 if not ON_GPU else LONG, K=K, V=V, dtype=jnp.bfloat16, gate_scale=0.1, use_h0=False,
           seed=4)


def test_no_initial_state_no_final_state():
    q, k, v, g, _, _ = _inputs(5, 63, 32, 64, jnp.float32, 1.0)
    o, s = gla_pallas(q, k, v, g, scale=0.2, initial_state=None, output_final_state=False,
                      segment_ids=None, backend="triton", interpret=not ON_GPU)
    want, _ = gla_reference(q, k, v, g, scale=0.2)
    assert s is None and rel_error(o, want) <= 1e-4


def test_supports():
    x = lambda d, dt=jnp.bfloat16: jnp.zeros((1, 8, 1, d), dt)
    assert supports(x(32), x(32), x(64), x(32))
    assert not supports(x(48), x(48), x(64), x(48))
    assert not supports(x(32, jnp.float16), x(32, jnp.float16), x(64, jnp.float16), x(32))
