"""The blocks' LayerNorms with the residual stream (Pallas, Triton lowering), one pass each way.

Forward: ``s = x + r`` (rounded to x's dtype, as the residual add is) and ``LayerNorm(s)``; both outputs are
written. Backward: from the gradients of both outputs, ``ds + LayerNorm'(s)^T dn`` (the gradient of x and of
r) and partial sums of the scale's and bias's gradients. Under XLA the backward of each LayerNorm took
three passes (the statistics, the row sums of the gradient, then the input's gradient with the weights'
partial sums), and the residual stream's gradient was added in another. Whole rows sit in one program, so
the statistics need no second pass; a program walks ``tiles.steps`` blocks of ``tiles.rows`` rows and keeps the
weights' gradients in registers across them.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import compiler_params


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Rows a program loads at a time (a forward program's whole block), the blocks a backward program walks,
    and the warps of each program."""
    rows: int = 2
    steps: int = 32
    warps: int = 4


TILES = Tiles()  # the fastest of an H200 sweep (docs/benchmarks.md)


def _sum_and_stats(x_ref, r_ref, rows, eps):
    """The residual sum on ``rows`` (in x's dtype, as float32), its centred form and reciprocal std."""
    s = x_ref[rows, :].astype(jnp.float32)
    if r_ref is not None:
        s = (s + r_ref[rows, :].astype(jnp.float32)).astype(x_ref.dtype).astype(jnp.float32)
    centred = s - jnp.mean(s, axis=1, keepdims=True)
    return s, centred, lax.rsqrt(jnp.mean(centred * centred, axis=1, keepdims=True) + eps)


def _forward_kernel(x_ref, r_ref, scale_ref, bias_ref, *outs, eps):
    sum_ref, out_ref = outs if r_ref is not None else (None, *outs)  # no residual: x is its own sum
    rows = pl.ds(0, x_ref.shape[0])
    s, centred, rstd = _sum_and_stats(x_ref, r_ref, rows, eps)
    if sum_ref is not None:
        sum_ref[...] = s.astype(sum_ref.dtype)
    out_ref[...] = (centred * rstd * scale_ref[...][None, :] + bias_ref[...][None, :]).astype(out_ref.dtype)


def _backward_kernel(x_ref, r_ref, scale_ref, dsum_ref, dout_ref, dx_ref, dscale_ref, dbias_ref, *, eps, tiles):
    scale = scale_ref[...][None, :]

    def step(i, sums):
        rows = pl.ds(pl.multiple_of(i * tiles.rows, tiles.rows), tiles.rows)
        _, centred, rstd = _sum_and_stats(x_ref, r_ref, rows, eps)
        xhat = centred * rstd
        dout = dout_ref[rows, :].astype(jnp.float32)
        g = dout * scale
        dx = rstd * (g - jnp.mean(g, axis=1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=1, keepdims=True))
        if dsum_ref is not None:
            dx += dsum_ref[rows, :].astype(jnp.float32)
        dx_ref[rows, :] = dx.astype(dx_ref.dtype)
        return sums[0] + dout * xhat, sums[1] + dout

    zeros = jnp.zeros((tiles.rows, scale.shape[1]), jnp.float32)
    dscale, dbias = lax.fori_loop(0, tiles.steps, step, (zeros, zeros))
    dscale_ref[...] = jnp.sum(dscale, axis=0)
    dbias_ref[...] = jnp.sum(dbias, axis=0)


def supports(x, tiles=TILES) -> bool:
    """Rows ``[N, D]`` that whole programs cover, ``D`` a power of two (Triton's block shapes) up to 8192."""
    N, D = x.shape
    return N % (tiles.rows * tiles.steps) == 0 and D & (D - 1) == 0 and D <= 8192


def _check(x, others, scale, tiles):
    if x.ndim != 2 or not supports(x, tiles) or any(o is not None and o.shape != x.shape for o in others) \
            or scale.shape != x.shape[1:]:
        raise ValueError(f"layer_norm: x [N, D] needs N a multiple of {tiles.rows * tiles.steps} and D a power of "
                         f"two up to 8192, the residual and gradients x's shape and the scale [D]; got x {x.shape}, "
                         f"scale {scale.shape}")


def layer_norm_forward(x, residual, scale, bias, *, eps, interpret=False, tiles=TILES):
    """``(x + residual, LayerNorm(x + residual))`` in x's dtype (only the norm when ``residual`` is None):
    x ``[N, D]``, scale and bias ``[D]``, statistics in float32."""
    _check(x, (residual,), scale, tiles)
    N, D = x.shape
    rows, vector = pl.BlockSpec((tiles.rows, D), lambda i: (i, 0)), pl.BlockSpec((D,), lambda i: (0,))
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)] * (2 if residual is not None else 1)

    outputs = pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps), grid=(N // tiles.rows,),
        in_specs=[rows, None if residual is None else rows, vector, vector],
        out_specs=[rows] * len(out_shape), out_shape=out_shape,
        compiler_params=compiler_params(num_warps=tiles.warps, num_stages=2), interpret=interpret,
        name="layer_norm_forward",
    )(x, residual, scale.astype(jnp.float32), bias.astype(jnp.float32))
    return tuple(outputs) if residual is not None else (x, outputs[0])


def layer_norm_backward(x, residual, scale, dsum, dout, *, eps, interpret=False, tiles=TILES):
    """``(dx, dscale, dbias)`` of ``layer_norm_forward``: dx the gradient of x (and of the residual), under
    the outputs' gradients ``dsum`` (of ``x + residual``, or of x; None for zero) and ``dout``."""
    _check(x, (residual, dsum, dout), scale, tiles)
    N, D = x.shape
    programs = N // (tiles.rows * tiles.steps)
    rows = pl.BlockSpec((tiles.rows * tiles.steps, D), lambda i: (i, 0))
    partial = pl.BlockSpec((None, D), lambda i: (i, 0))
    dx, dscale, dbias = pl.pallas_call(
        functools.partial(_backward_kernel, eps=eps, tiles=tiles), grid=(programs,),
        in_specs=[rows, None if residual is None else rows, pl.BlockSpec((D,), lambda i: (0,)),
                  None if dsum is None else rows, rows],
        out_specs=[rows, partial, partial],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((programs, D), jnp.float32),
                   jax.ShapeDtypeStruct((programs, D), jnp.float32)],
        compiler_params=compiler_params(num_warps=tiles.warps, num_stages=2), interpret=interpret,
        name="layer_norm_backward",
    )(x, residual, scale.astype(jnp.float32), dsum, dout)
    return dx, dscale.sum(axis=0), dbias.sum(axis=0)
