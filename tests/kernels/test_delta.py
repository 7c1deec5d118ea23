"""Delta-rule Pallas kernels (plain and gated) vs the token-scan references: outputs, final
states and all gradients.

On CPU the kernels run in interpret mode at tiny shapes. On a GPU run the same checks
compiled, at full lengths:
``JAX_PLATFORMS=cuda KERNELS_ON_GPU=1 python -m pytest tests/kernels -q``.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from jaxlin import ops
from jaxlin.ops.dispatch import pallas_backend
from jaxlin.ops.reference import delta_rule_reference, gated_delta_rule_reference
from kernels.common import CHUNK
from kernels.delta import delta_pallas, mosaic_supports, supports
from kernels.delta.mosaic_backward import gate_grads
from kernels.delta.forward import unit_lower_inverse
from tests.kernels.kernel_checks import LONG, ON_GPU, TOL, fast_only_at, packed_segments, rel_error, value_and_grads

BATCH, HEADS = (2, 4) if ON_GPU else (1, 2)  # HEADS even: see _per_head
# dg is a small difference of O(1) terms, so it amplifies the bf16 rounding of the forward's
# residuals: 1.04e-2 at K=128, V=32 (1.09e-2 with float32 matmuls in the gradient kernel).
TOL_DG_BF16 = 2e-2
SEGMENTS = (5, 64, 65, 66, 100)  # mid-chunk, on a chunk edge, just after it, a one-token segment


def _inputs(seed, T, K, V, dtype, gate_scale, beta_range):
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    shape = (BATCH, T, HEADS)
    q = ops.l2norm(jax.random.normal(keys[0], shape + (K,)))
    k = ops.l2norm(jax.random.normal(keys[1], shape + (K,)))
    v = jax.random.normal(keys[2], shape + (V,))
    g = -jax.random.uniform(keys[3], shape, minval=0.5, maxval=1.5) * gate_scale
    beta = jax.random.uniform(keys[4], shape, minval=beta_range[0], maxval=beta_range[1])
    h0 = jax.random.normal(keys[5], (BATCH, HEADS, K, V))
    cast = lambda x: x.astype(dtype)
    return cast(q), cast(k), cast(v), cast(g), cast(beta), h0, keys[6]


def _outputs_and_grads(fn, gated, q, k, v, g, beta, h0, cot_key, segment_ids, use_h0):
    def run(q, k, v, g, beta, h0):
        gates = (g, beta) if gated else (beta,)
        return fn(q, k, v, *gates, scale=q.shape[-1] ** -0.5, initial_state=h0 if use_h0 else None,
                  output_final_state=True, segment_ids=segment_ids)

    return value_and_grads(run, (q, k, v, g, beta, h0), cot_key)


def _check(T, gated=True, K=32, V=64, dtype=jnp.float32, gate_scale=0.1, beta_range=(0.0, 1.0),
           segments=None, use_h0=True, seed=0, backend=None):
    """``backend`` None: the one ``impl="pallas"`` takes for these inputs."""
    q, k, v, g, beta, h0, cot_key = _inputs(seed, T, K, V, dtype, gate_scale, beta_range)
    seg = None if segments is None else packed_segments(BATCH, T, segments)
    backend = backend or pallas_backend("gated_delta_rule", (q, k, v, g, beta))
    kernel = delta_pallas if gated else lambda q, k, v, beta, **kw: delta_pallas(q, k, v, None, beta, **kw)
    pallas = lambda *a, **kw: kernel(*a, **kw, interpret=not ON_GPU, backend=backend)
    reference = gated_delta_rule_reference if gated else delta_rule_reference
    args = (q, k, v, g, beta, h0, cot_key)
    got = jax.jit(lambda *a: _outputs_and_grads(pallas, gated, *a, seg, use_h0))(*args)
    want = jax.jit(lambda *a: _outputs_and_grads(reference, gated, *a, seg, use_h0))(*args)
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    skip = {"dg"} if not gated else set()
    skip |= {"dh0"} if not use_h0 else set()
    errors = {n: rel_error(x, y) for n, x, y in zip(names, got, want) if n not in skip}
    assert got[0].dtype == v.dtype and got[0].shape == v.shape
    assert got[1].dtype == jnp.float32 and got[1].shape == h0.shape
    tol = lambda n: TOL_DG_BF16 if n == "dg" and dtype == jnp.bfloat16 else TOL[dtype]
    bad = {n: e for n, e in errors.items() if not e <= tol(n)}
    assert not bad, f"relative errors over tolerance: {bad} (all: {errors})"


@pytest.mark.parametrize("T", fast_only_at(65, (1, 63, 64, 65)))
def test_lengths_gated_f32(T):
    _check(T)


@pytest.mark.slow
def test_delta_rule_f32():
    _check(LONG, gated=False, segments=SEGMENTS, seed=1)


@pytest.mark.slow
def test_packed_segments_gated_f32():
    _check(LONG, segments=SEGMENTS, seed=2)


def _per_head(first, second):
    """One value for even heads, another for odd ones: two regimes in one call."""
    return jnp.array([first, second] * (HEADS // 2))


@pytest.mark.slow
def test_beta_extremes_f32():
    _check(65, beta_range=(_per_head(0.0, 0.999), _per_head(1e-3, 1.0)), seed=3)


# gates near 0, and about e^-20 per token (separate calls: one norm would hide the tiny dg of the latter)
@pytest.mark.slow
@pytest.mark.parametrize("gate_scale", [1e-4, 20.0])
def test_gate_extremes_f32(gate_scale):
    _check(LONG, gate_scale=gate_scale, segments=(70,), seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("backend,K", [("mosaic", 64), ("triton", 32)])
def test_bf16_segments(backend, K):
    _check(LONG, K=K, dtype=jnp.bfloat16, segments=(17, 64), seed=5, backend=backend)


# The Mosaic GPU kernels (bf16, K and V in {64, 128}), forward and backward.
@pytest.mark.parametrize("T", fast_only_at(65, (1, 63, 65)))
def test_mosaic_lengths_gated(T):
    _check(T, K=64, dtype=jnp.bfloat16, seed=9, backend="mosaic")


@pytest.mark.slow
def test_mosaic_delta_rule_wide_heads():
    # V = 128 splits the state pass in two V-blocks
    _check(LONG, gated=False, K=128, V=128, dtype=jnp.bfloat16, segments=SEGMENTS, seed=10,
           backend="mosaic")


@pytest.mark.slow
def test_mosaic_extremes():
    # gates about e^-20 per token (pair decays underflow to 0, never overflow), beta near 0 and near 1
    _check(LONG, K=64, dtype=jnp.bfloat16, gate_scale=20.0, segments=(70,), seed=11, backend="mosaic",
           beta_range=(_per_head(0.0, 0.999), _per_head(1e-3, 1.0)))


def test_mosaic_refuses_what_it_cannot_run():
    x = lambda d, dt=jnp.bfloat16: jnp.ones((1, 8, 2, d), dt)
    gate = -jnp.ones((1, 8, 2))
    assert mosaic_supports(x(64), x(64), x(128)) and not mosaic_supports(x(32), x(32), x(64))
    assert not mosaic_supports(x(64, jnp.float32), x(64, jnp.float32), x(64, jnp.float32))
    kwargs = dict(scale=1.0, initial_state=None, output_final_state=False, segment_ids=None)
    with pytest.raises(ValueError, match="backend='mosaic' needs bf16"):
        delta_pallas(x(32), x(32), x(64), gate, gate, **kwargs, backend="mosaic")
    with pytest.raises(ValueError, match="expected one of"):
        delta_pallas(x(64), x(64), x(64), gate, gate, **kwargs, backend="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("K,V", [(128, 32), (64, 128)])
def test_head_dims_bf16(K, V):
    _check(64 if not ON_GPU else LONG, K=K, V=V, dtype=jnp.bfloat16, use_h0=False, seed=6)


def test_unit_lower_inverse():
    """The chunk transform's ``(I + A)^-1`` on its own, float32, inside a kernel: ``A`` as the delta
    rule builds it (beta k_t.k_s under mild decay), once from random keys and once from nearly
    parallel ones (entries of A up to 0.95)."""
    keys = jax.random.split(jax.random.PRNGKey(8), 4)
    k = ops.l2norm(jax.random.normal(keys[0], (2, CHUNK, 32)))
    k = k.at[1].set(ops.l2norm(k[1, :1] + 0.1 * k[1]))
    beta = jax.random.uniform(keys[1], (2, CHUNK, 1), minval=0.5, maxval=1.0)
    b = jnp.cumsum(-jax.random.uniform(keys[2], (2, CHUNK), maxval=0.05), axis=1)
    decay = jnp.exp(jnp.minimum(b[:, :, None] - b[:, None, :], 0.0))
    a = jnp.tril(beta * (k @ jnp.swapaxes(k, 1, 2)) * decay, -1)

    def kernel(a_ref, x_ref):
        x_ref[...] = unit_lower_inverse(a_ref[...])

    spec = pl.BlockSpec((None, CHUNK, CHUNK), lambda i: (i, 0, 0))
    got = pl.pallas_call(kernel, grid=(2,), in_specs=[spec], out_specs=spec,
                         out_shape=jax.ShapeDtypeStruct(a.shape, jnp.float32), interpret=not ON_GPU)(a)
    assert float(jnp.max(jnp.abs(a[1]))) > 0.9
    for i in range(2):
        want = jnp.linalg.inv(jnp.eye(CHUNK) + a[i])
        assert rel_error(got[i], want) <= 1e-5, (i, rel_error(got[i], want))


def test_dispatch_no_initial_state_no_final_state():
    q, k, v, g, beta, _, _ = _inputs(7, 63, 32, 64, jnp.float32, 1.0, (0.0, 1.0))
    o, s = ops.gated_delta_rule(q, k, v, g, beta, scale=0.2, impl="pallas")
    want, _ = gated_delta_rule_reference(q, k, v, g, beta, scale=0.2)
    assert s is None and rel_error(o, want) <= 1e-4
    o, s = ops.delta_rule(q, k, v, beta, scale=0.2, impl="pallas")
    want, _ = delta_rule_reference(q, k, v, beta, scale=0.2)
    assert s is None and rel_error(o, want) <= 1e-4


def test_supports():
    x = lambda d, dt=jnp.bfloat16: jnp.zeros((1, 8, 1, d), dt)
    gate = jnp.zeros((1, 8, 1))
    assert supports(x(32), x(32), x(64), gate, gate)
    assert not supports(x(48), x(48), x(64), gate, gate)
    assert not supports(x(32, jnp.float16), x(32, jnp.float16), x(64, jnp.float16), gate, gate)


def test_gate_grads_are_those_of_the_cumulative_gates():
    """The Mosaic backward's per-token gate gradients (of each ``b_t`` and of each ``b_last - b_s``)
    become log-gate gradients as autodiff of the within-chunk cumsum gives them."""
    keys = jax.random.split(jax.random.PRNGKey(12), 3)
    B, T, H = 2, 2 * CHUNK, 3
    db, d_to_end = jax.random.normal(keys[0], (B, T, H)), jax.random.normal(keys[1], (B, T, H))

    def linear(g):
        b = jnp.cumsum(g.reshape(B, T // CHUNK, CHUNK, H), axis=2)
        to_end = b[:, :, -1:] - b
        return jnp.sum(db * b.reshape(B, T, H)) + jnp.sum(d_to_end * to_end.reshape(B, T, H))

    want = jax.grad(linear)(jax.random.normal(keys[2], (B, T, H)))
    assert rel_error(gate_grads(db, d_to_end), want) <= 1e-6
