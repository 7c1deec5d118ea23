"""Chunked (and auto) forms against the token-by-token reference: outputs, final states, all gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin import ops

B, H = 2, 2


def _gates(rng, kind, shape):
    if kind == "normal":
        return -rng.uniform(0.01, 1.0, shape)
    if kind == "near0":  # includes exact zeros (no decay at all)
        return -rng.uniform(0.0, 1e-3, shape) * (rng.uniform(size=shape) < 0.7)
    if kind == "very_neg":  # cumulative sums reach -1900 inside one chunk of 64
        return -rng.uniform(20.0, 30.0, shape)
    assert kind == "mixed"
    return np.where(rng.uniform(size=shape) < 0.5, -rng.uniform(20.0, 30.0, shape), -rng.uniform(0.01, 1.0, shape))


def _betas(rng, kind, shape):
    lo, hi = {"mid": (0.05, 0.95), "low": (0.0, 0.02), "high": (0.98, 1.0)}[kind]
    return rng.uniform(lo, hi, shape)


def _segments(T):
    """Row 0: increasing ids with length-1 documents (at 1, 64 and T-1) and a start at the chunk edge 64.
    Row 1: ids alternating 0/1 (a restart is a *change* of id, not a new id), starts at 64 too,
    and a last document long enough for the final state to see several tokens."""
    ids = np.zeros((B, T), np.int32)
    for row, starts in enumerate(([1, 2, 37, 64, 65, 128, 200, T - 1], [20, 48, 64, 150])):
        for s in starts:
            if 0 < s < T:
                ids[row, s:] += 1
    ids[1] %= 2
    return jnp.asarray(ids)


def make_case(op, T, K, V, *, gate="normal", beta="mid", segments=True, init=True, l2=False,
              dtype=jnp.float32, gate_dtype=jnp.float32, seed=0):
    """Positional differentiable args, static kwargs, and random cotangents for (o, final_state)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    if op != "gla" and not l2:
        k *= 0.8 / np.sqrt(K)  # beta |k|^2 < 2 keeps the un-normalised delta rule stable
    v = rng.standard_normal((B, T, H, V))
    args = [jnp.asarray(x, dtype) for x in (q, k, v)]
    if op == "gla":
        args.append(jnp.asarray(_gates(rng, gate, (B, T, H, K)), gate_dtype))
    if op == "gated_delta_rule":
        args.append(jnp.asarray(_gates(rng, gate, (B, T, H)), gate_dtype))
    if op != "gla":
        args.append(jnp.asarray(_betas(rng, beta, (B, T, H)), gate_dtype))
    if init:
        args.append(jnp.asarray(0.5 * rng.standard_normal((B, H, K, V)), jnp.float32))
    kwargs = dict(segment_ids=_segments(T) if segments else None)
    if op != "gla":
        kwargs["use_qk_l2norm"] = l2
    cot = (jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32),
           jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32))
    return args, kwargs, init, cot


def run(op, impl, args, kwargs, init, cot):
    """``(o, final_state, grads of <o, co> + <S, cS> w.r.t. every positional arg)``."""
    fn = getattr(ops, op)

    def loss(*a):
        inputs, s0 = (a[:-1], a[-1]) if init else (a, None)
        o, S = fn(*inputs, initial_state=s0, output_final_state=True, impl=impl, **kwargs)
        return jnp.sum(o.astype(jnp.float32) * cot[0]) + jnp.sum(S * cot[1]), (o, S)

    with jax.default_matmul_precision("highest"):
        (_, (o, S)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return o, S, grads


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_close(got, want, tol, what):
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(g)), f"{what}: non-finite values"
    assert np.all(np.isfinite(w)) and np.any(w != 0), f"{what}: degenerate reference"
    assert rel(g, w) <= tol, f"{what}: relative error {rel(g, w):.2e} > {tol}"


def names(op, init):
    n = ["q", "k", "v"] + (["g"] if op != "delta_rule" else []) + (["beta"] if op != "gla" else [])
    return n + (["initial_state"] if init else [])


# A covering set, not a product: every T, head dims (K != V both ways), gates near 0 / very
# negative, beta near 0 / 1, segments and initial state on and off, l2norm on and off.
CASES = [
    # op, T, K, V, options, impl
    ("gla", 1, 16, 16, dict(segments=False), "chunked"),
    ("gla", 63, 32, 64, dict(), "chunked"),
    ("gla", 64, 64, 32, dict(gate="near0", init=False), "chunked"),
    ("gla", 100, 16, 16, dict(gate="very_neg"), "auto"),
    ("gla", 257, 32, 32, dict(gate="mixed"), "chunked"),
    ("delta_rule", 1, 16, 16, dict(l2=True), "chunked"),
    ("delta_rule", 63, 32, 64, dict(beta="high"), "chunked"),
    ("delta_rule", 64, 64, 32, dict(beta="low", init=False, l2=True), "chunked"),
    ("delta_rule", 100, 16, 16, dict(l2=True, segments=False), "auto"),
    ("delta_rule", 257, 32, 32, dict(beta="high", l2=True), "chunked"),
    ("gated_delta_rule", 1, 16, 16, dict(), "chunked"),
    ("gated_delta_rule", 63, 32, 64, dict(gate="very_neg", beta="high", l2=True), "chunked"),
    ("gated_delta_rule", 64, 64, 32, dict(gate="near0", beta="low", init=False), "chunked"),
    ("gated_delta_rule", 100, 16, 16, dict(l2=True), "auto"),
    ("gated_delta_rule", 257, 32, 32, dict(gate="mixed", beta="high", l2=True), "chunked"),
]


# T >= 100 in the slow tier: the fast one keeps a case of every op below and at one chunk.
@pytest.mark.parametrize("op,T,K,V,opts,impl", [pytest.param(*c, marks=pytest.mark.slow if c[1] >= 100 else ())
                                                 for c in CASES], ids=lambda x: str(x) if not isinstance(x, dict) else
                         "-".join(f"{k}={v}" for k, v in x.items()) or "default")
def test_matches_reference_float32(op, T, K, V, opts, impl):
    case = make_case(op, T, K, V, **opts)
    o_ref, s_ref, g_ref = run(op, "reference", *case)
    o, s, grads = run(op, impl, *case)
    assert o.dtype == jnp.float32 and o.shape == (B, T, H, V) and s.shape == (B, H, K, V)
    assert_close(o, o_ref, 1e-4, "o")
    assert_close(s, s_ref, 1e-4, "final_state")
    for name, g, gr in zip(names(op, case[2]), grads, g_ref):
        assert_close(g, gr, 1e-4, f"d{name}")


@pytest.mark.parametrize("op,opts", [
    ("gla", dict(gate="mixed")),
    pytest.param("delta_rule", dict(l2=True, gate_dtype=jnp.bfloat16), marks=pytest.mark.slow),
    pytest.param("gated_delta_rule", dict(gate="mixed", l2=True, gate_dtype=jnp.bfloat16), marks=pytest.mark.slow),
])
def test_matches_reference_bfloat16(op, opts):
    case = make_case(op, 100, 32, 64, dtype=jnp.bfloat16, **opts)
    o_ref, s_ref, g_ref = run(op, "reference", *case)
    o, s, grads = run(op, "chunked", *case)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(o, o_ref, 1e-2, "o")
    assert_close(s, s_ref, 1e-2, "final_state")
    for name, g, gr in zip(names(op, case[2]), grads, g_ref):
        assert_close(g, gr, 1e-2, f"d{name}")

