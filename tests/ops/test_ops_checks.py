"""Argument validation (ValueError naming the argument) and impl dispatch."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from jaxlin import ops
from jaxlin.ops import dispatch

B, T, H, K, V = 1, 4, 2, 16, 32


def ok_args():
    key = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(key[0], (B, T, H, K))
    k = jax.random.normal(key[1], (B, T, H, K))
    v = jax.random.normal(key[2], (B, T, H, V))
    gk = -jax.random.uniform(key[3], (B, T, H, K))
    return q, k, v, gk, gk[..., 0], jnp.full((B, T, H), 0.5)


def call(op, **change):
    """Call ``op`` with valid arguments except those in ``change``."""
    q, k, v, gk, gh, beta = ok_args()
    a = dict(q=q, k=k, v=v)
    if op == "gla":
        a["g"] = gk
    if op == "gated_delta_rule":
        a["g"] = gh
    if op != "gla":
        a["beta"] = beta
    a.update(change)
    return getattr(ops, op)(**a)


x = jnp.zeros
BAD = [
    # op, changed arguments, words the message must contain
    ("gla", dict(q=x((B, T, K))), "q must have rank 4"),
    ("gla", dict(k=x((B, T, H, K + 16))), "k must have shape"),
    ("gla", dict(v=x((B, T + 1, H, V))), "v must have shape"),
    ("delta_rule", dict(v=x((B, T, H + 1, V))), "v must have shape"),
    ("gla", dict(g=x((B, T, H))), "g must have rank 4"),
    ("gated_delta_rule", dict(g=x((B, T, H, K))), "g must have rank 3"),
    ("gated_delta_rule", dict(g=x((B, T + 1, H))), "g must have shape"),
    ("delta_rule", dict(beta=x((B, T, H, 1))), "beta must have rank 3"),
    ("gla", dict(k=x((B, T, H, K), jnp.bfloat16)), "k must have dtype float32"),
    ("delta_rule", dict(v=x((B, T, H, V), jnp.bfloat16)), "v must have dtype float32"),
    ("gla", dict(g=x((B, T, H, K), jnp.float16)), "g must have dtype float32"),
    ("delta_rule", dict(beta=x((B, T, H), jnp.int32)), "beta must have dtype"),
    ("gla", dict(q=x((B, T, H, K), jnp.int32), k=x((B, T, H, K), jnp.int32)), "q must have a floating dtype"),
    ("gla", dict(initial_state=x((B, H, V, K))), "initial_state must have shape"),
    ("delta_rule", dict(initial_state=x((B, H, K))), "initial_state must have rank 4"),
    ("gla", dict(segment_ids=x((B, T), jnp.float32)), "segment_ids must have an integer dtype"),
    ("gated_delta_rule", dict(segment_ids=x((B, T + 1), jnp.int32)), "segment_ids must have shape"),
    ("gla", dict(impl="fast"), "impl must be one of"),
    ("delta_rule", dict(q=x((B, T, H, 8)), k=x((B, T, H, 8))), "head dim K"),
    ("gated_delta_rule", dict(v=x((B, T, H, 512))), "head dim V"),
    ("gla", dict(q=x((B, 0, H, K)), k=x((B, 0, H, K)), v=x((B, 0, H, V)), g=x((B, 0, H, K))), "T >= 1"),
    ("gla", dict(g=jnp.full((B, T, H, K), 0.1), validate=True), "g is a log gate and must be <= 0"),
    ("gated_delta_rule", dict(g=jnp.full((B, T, H), 0.1), validate=True), "g is a log gate"),
]


@pytest.mark.parametrize("op,change,words", BAD, ids=[w for _, _, w in BAD])
def test_bad_call_raises_value_error(op, change, words):
    with pytest.raises(ValueError, match=words):
        call(op, **change)


def test_validate_under_jit_is_a_clear_error():
    q, k, v, gk, _, _ = ok_args()
    with pytest.raises(ValueError, match="validate=True needs concrete g"):
        jax.jit(lambda g: ops.gla(q, k, v, g, validate=True))(gk)


def test_gates_of_the_other_dtype_are_accepted():
    q, k, v, _, gh, beta = ok_args()
    bf = lambda a: a.astype(jnp.bfloat16)
    o, s = ops.gated_delta_rule(bf(q), bf(k), bf(v), gh, bf(beta), impl="reference")
    assert o.dtype == jnp.bfloat16 and s is None


def test_pallas_dispatch_and_auto_fallback(monkeypatch):
    seen = {}

    def gla_pallas(q, k, v, g, **kw):
        seen.update(kw)
        return jnp.full(v.shape, 7.0, v.dtype), None  # recognisably the fake kernel's output

    table = dispatch.LINEAR_ATTENTION["gla"]
    monkeypatch.setitem(dispatch.LINEAR_ATTENTION, "gla",
                        dataclasses.replace(table, pallas=gla_pallas, supports=lambda *a: True))
    from_kernel = lambda o: bool(jnp.all(o == 7.0))
    assert from_kernel(call("gla", impl="pallas")[0])
    assert seen["interpret"] is True and seen["scale"] == K ** -0.5 and seen["backend"] == "triton"  # float32
    assert from_kernel(call("gla", impl="pallas:mosaic")[0]) and seen["backend"] == "mosaic"

    assert not from_kernel(call("gla", impl="auto")[0])  # CPU: never the kernel
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert from_kernel(call("gla", impl="auto")[0])
    declines = dataclasses.replace(table, pallas=gla_pallas, supports=lambda *a: False)
    monkeypatch.setitem(dispatch.LINEAR_ATTENTION, "gla", declines)  # auto falls back to chunked
    q, k, v, gk, _, _ = ok_args()
    o, _ = jax.jit(lambda *a: ops.gla(*a, impl="auto"))(q, k, v, gk)
    want, _ = ops.gla(q, k, v, gk, impl="reference")
    assert jnp.allclose(o, want, rtol=1e-4, atol=1e-5)


def test_no_final_state_unless_asked():
    q, k, v, gk, _, _ = ok_args()
    for impl in ("reference", "chunked"):
        o, s = jax.jit(lambda *a: ops.gla(*a, impl=impl))(q, k, v, gk)
        assert s is None and o.shape == (B, T, H, V)


def test_pallas_takes_mosaic_where_it_applies():
    bf16 = lambda *shape: jnp.zeros(shape, jnp.bfloat16)
    assert dispatch.pallas_backend("gla", (bf16(1, 8, 1, 32), bf16(1, 8, 1, 32), bf16(1, 8, 1, 64),
                                           bf16(1, 8, 1, 32))) == "mosaic"
    assert dispatch.pallas_backend("gla", ok_args()[:4]) == "triton"  # float32
    assert dispatch.pallas_backend("delta_rule", (bf16(1, 8, 1, 64),) * 3 + (bf16(1, 8, 1),)) == "mosaic"
    assert dispatch.pallas_backend("gated_delta_rule", (bf16(1, 8, 1, 32),) * 3 + (bf16(1, 8, 1),) * 2) == "triton"
