"""The gated RMSNorm after the recurrence (FLA's FusedRMSNormGated), forward and backward in one pass
each (Pallas, Triton lowering).

``out = x * rsqrt(mean(x^2) + eps) * w * silu(g)`` over rows of ``D``: x and g ``[N, D]`` (one row per token
and head), w ``[D]``. Under XLA the backward took three passes (the row statistics, then x's and w's
gradients, then g's inside another fusion); here each program reads its rows of x, g and the output's
gradient once, and writes x's and g's gradients and a partial sum of w's.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import compiler_params


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Rows per program, and its warps."""
    rows: int = 32
    warps: int = 4


TILES = Tiles()  # the fastest of an H200 sweep (docs/benchmarks.md)


def _normalized(x, w, eps):
    rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=1, keepdims=True) + eps)
    return x * rstd * w, rstd


def _forward_kernel(x_ref, g_ref, w_ref, out_ref, *, eps):
    g = g_ref[...].astype(jnp.float32)
    normed, _ = _normalized(x_ref[...].astype(jnp.float32), w_ref[...][None, :], eps)
    out_ref[...] = (normed * g * jax.nn.sigmoid(g)).astype(out_ref.dtype)


def _backward_kernel(x_ref, g_ref, w_ref, dout_ref, dx_ref, dg_ref, dw_ref, *, eps):
    x, g, dout = (ref[...].astype(jnp.float32) for ref in (x_ref, g_ref, dout_ref))
    w = w_ref[...][None, :]
    normed, rstd = _normalized(x, w, eps)
    sig = jax.nn.sigmoid(g)
    dg_ref[...] = (dout * normed * sig * (1.0 + g * (1.0 - sig))).astype(dg_ref.dtype)
    d_normed = dout * g * sig
    dw_ref[...] = jnp.sum(d_normed * x * rstd, axis=0)
    dxhat = d_normed * w
    dx = rstd * dxhat - x * (rstd * rstd * rstd) * jnp.mean(dxhat * x, axis=1, keepdims=True)
    dx_ref[...] = dx.astype(dx_ref.dtype)


def supports(x, tiles=TILES) -> bool:
    """Rows ``[N, D]`` that whole programs cover, ``D`` a power of two (Triton's block shapes)."""
    N, D = x.shape
    return N % tiles.rows == 0 and D & (D - 1) == 0


def _check(x, g, w, tiles):
    if x.ndim != 2 or not supports(x, tiles) or g.shape != x.shape or w.shape != x.shape[1:]:
        raise ValueError(f"gated_norm: x and g must be [N, D] with N a multiple of {tiles.rows} and D a power of two, "
                         f"w [D]; got x {x.shape}, g {g.shape}, w {w.shape}")


def _rows(D, tiles):
    return pl.BlockSpec((tiles.rows, D), lambda i: (i, 0))


def gated_norm_forward(x, g, w, *, eps, interpret=False, tiles=TILES):
    """``x * rsqrt(mean(x^2) + eps) * w * silu(g)`` in x's dtype, row by row, in float32."""
    _check(x, g, w, tiles)
    N, D = x.shape
    rows = _rows(D, tiles)
    return pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps), grid=(N // tiles.rows,),
        in_specs=[rows, rows, pl.BlockSpec((D,), lambda i: (0,))], out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=compiler_params(num_warps=tiles.warps, num_stages=2), interpret=interpret,
        name="gated_norm_forward",
    )(x, g, w.astype(jnp.float32))


def gated_norm_backward(x, g, w, dout, *, eps, interpret=False, tiles=TILES):
    """``(dx, dg, dw)`` of ``gated_norm_forward`` under the output's gradient ``dout``; dw in float32."""
    _check(x, g, w, tiles)
    N, D = x.shape
    rows = _rows(D, tiles)
    dx, dg, dw = pl.pallas_call(
        functools.partial(_backward_kernel, eps=eps), grid=(N // tiles.rows,),
        in_specs=[rows, rows, pl.BlockSpec((D,), lambda i: (0,)), rows],
        out_specs=[rows, rows, pl.BlockSpec((None, D), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(g.shape, g.dtype),
                   jax.ShapeDtypeStruct((N // tiles.rows, D), jnp.float32)],
        compiler_params=compiler_params(num_warps=tiles.warps, num_stages=2), interpret=interpret,
        name="gated_norm_backward",
    )(x, g, w.astype(jnp.float32), dout)
    return dx, dg, dw.sum(axis=0)
