"""The short convolutions' joined backward (kernels/short_conv.py, via jaxlin.ops.conv.conv_and_split)
against autodiff of the XLA formula.

Interpret mode on CPU at small, awkward shapes; compiled at GPT-2 Medium's shape with ``KERNELS_ON_GPU=1``.
The Triton lowering is checked on any machine against an abstract H100.
"""


import jax
import jax.numpy as jnp
import pytest

from jaxlin.ops import conv
from kernels import short_conv
from tests.kernels.kernel_checks import ON_GPU, lower_triton_for_cuda, packed_segments, rel_error

# (B, T, conv widths, pass-through widths): GLA's q, k, v convolved and two pieces passed through (GLA's
# output gate and forget-gate input, joined until the output gate became a product of its own), lengths and
# widths that the program tiles do not divide.
SHAPES = [(2, 37, (32, 32, 64), (64, 5))] + ([(32, 1024, (512, 512, 1024), (1024, 16))] if ON_GPU else [])


def _inputs(B, T, widths, rest, dtype, seed=0, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 3)
    y = (scale * jax.random.normal(keys[0], (B, T, sum(widths) + sum(rest)))).astype(dtype)
    kernels = [jax.random.uniform(k, (4, w), jnp.float32, -0.5, 0.5)
               for k, w in zip(jax.random.split(keys[1], len(widths)), widths)]
    grads = tuple(jax.random.normal(k, (B, T, w)).astype(dtype)
                  for k, w in zip(jax.random.split(keys[2], len(widths) + len(rest)), widths + rest))
    return y, kernels, grads


def _vjp(impl, y, kernels, rest, grads, segment_ids):
    split = lambda y, kernels: sum(conv.conv_and_split(y, kernels, rest, segment_ids=segment_ids, impl=impl), ())
    outputs, vjp = jax.vjp(split, y, kernels)
    return outputs, vjp(grads)


@pytest.mark.slow
@pytest.mark.parametrize("B,T,widths,rest", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_joined_backward_matches_autodiff(B, T, widths, rest, packed, dtype):
    y, kernels, grads = _inputs(B, T, list(widths), list(rest), dtype)
    segment_ids = packed_segments(B, T, (T // 4, T // 2 + 1, T - 2)) if packed else None
    want_out, (want_dy, want_dk) = _vjp("xla", y.astype(jnp.float32), kernels, rest,
                                        tuple(g.astype(jnp.float32) for g in grads), segment_ids)
    out, (dy, dk) = _vjp("pallas", y, kernels, rest, grads, segment_ids)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert dy.dtype == dtype and all(d.dtype == jnp.float32 for d in dk)
    for got, want in zip(out + (dy, *dk), want_out + (want_dy, *want_dk)):
        assert rel_error(got, want) < tol


@pytest.mark.slow
def test_extreme_inputs_stay_finite_and_exact():
    """Pre-activations of +-hundreds saturate SiLU's derivative (sigmoid at 0 or 1)."""
    y, kernels, grads = _inputs(1, 40, [16, 16, 32], [8], jnp.float32, seed=3, scale=300.0)
    (_, (want_dy, want_dk)), (_, (dy, dk)) = (_vjp(impl, y, kernels, (8,), grads, None) for impl in ("xla", "pallas"))
    for got, want in zip((dy, *dk), (want_dy, *want_dk)):
        assert rel_error(got, want) < 1e-5


def test_widths_that_do_not_add_up_are_refused():
    y, kernels, grads = _inputs(1, 16, [16, 16, 32], [8], jnp.float32)
    with pytest.raises(ValueError, match="must sum to y's 72 columns"):
        short_conv.conv_join_backward(y, jnp.concatenate(kernels, axis=1), grads[:3], grads[3:] + grads[3:],
                                      interpret=True)


@pytest.mark.parametrize("packed", [False, True])
def test_lowers_for_cuda_at_gpt2_medium_shape(packed):
    B, T = 32, 1024
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    grads = tuple(spec(B, T, w) for w in (512, 512, 1024, 1024, 16))
    seg = spec(B, T, dtype=jnp.int32) if packed else None
    both = lambda y, kernel, grads, seg: (short_conv.conv_forward(y, kernel, (512, 512, 1024), seg),
                                          short_conv.conv_join_backward(y, kernel, grads[:3], grads[3:], seg))
    text = lower_triton_for_cuda(both, spec(B, T, 3088), spec(4, 2048, dtype=jnp.float32), grads, seg)
    assert "conv_forward" in text and "conv_join_backward" in text


@pytest.mark.slow
@pytest.mark.parametrize("tiles", [short_conv.Tiles(rows=4, cols=32, steps=3, warps=4),
                                   short_conv.Tiles(rows=2, cols=16, steps=5, warps=4),
                                   short_conv.Tiles(rows=8, cols=64, steps=1, warps=4),
                                   short_conv.Tiles(rows=1, cols=16, steps=2, warps=4)])
def test_tiles_that_split_the_sequence_over_programs(tiles):
    """Several programs along time (37 rows: 4 programs of 12 rows, of 10, 5 of 8, 19 of 2, the last one
    cut short): the walk's window and its K - 1 rows past a program's end cross program boundaries (and
    segment boundaries, at rows 9 and 20), even when a program has fewer rows than K - 1; walks whose
    rows a step does not divide; column blocks narrower than a piece."""
    B, T, widths, rest = 2, 37, [32, 32, 64], [64, 5]
    y, kernels, grads = _inputs(B, T, widths, rest, jnp.float32, seed=4)
    segment_ids = packed_segments(B, T, (9, 20))
    want_out, (want_dy, want_dk) = _vjp("xla", y, kernels, tuple(rest), grads, segment_ids)
    kernel = jnp.concatenate(kernels, axis=1)
    out = short_conv.conv_forward(y, kernel, widths, segment_ids, interpret=True, tiles=tiles)
    dy, dk = short_conv.conv_join_backward(y, kernel, grads[:3], grads[3:], segment_ids, interpret=True, tiles=tiles)
    for got, want in zip((*out, dy, dk), (*want_out[:3], want_dy, jnp.concatenate(want_dk, axis=1))):
        assert rel_error(got, want) < 1e-5
