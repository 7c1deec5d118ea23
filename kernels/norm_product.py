"""A decoding step's LayerNorm inside the product that reads it (Pallas, Triton lowering).

For the few rows of a decoding step, ``x [B, D]`` (the residual stream) and the last sublayer's output
``delta [B, D]``, one kernel writes the residual sum ``s = x + delta`` and ``act(LayerNorm(s) @ w)``. Under
XLA a step's LayerNorm took six kernels of about a microsecond each (the statistics' two reductions, casts,
the scaling, the residual add) beside each product that streams a layer's weights; those are latency, not
bandwidth, at a few kilobytes of rows.

A program owns ``tiles.n`` columns of ``w``. It first walks the rows once for their statistics (the mean and
mean square, as Flax's LayerNorm), then streams its columns of ``w`` in ``tiles.k``-row slices, normalising
each slice of the rows as it goes; the first program also stores ``s``. Up to ``LOOP_ROWS`` rows are taken one
at a time (element-wise products, summed once at the end); whole blocks of 16 to 64 rows go to the tensor
cores. Values are rounded where the XLA step rounds them: ``s`` and the normed rows to x's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from .common import compiler_params

LOOP_ROWS = 8  # rows taken one at a time; more go to tl.dot in blocks of DOT_ROWS
DOT_ROWS = (16, 32, 64)
GELU_CUBIC = 0.044715


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Columns of w a program owns (halved where they do not divide w's: GLA's joined kernel has 16 columns
    of its low-rank gate), rows of w it loads at a time, its warps and pipeline stages."""
    n: int = 32
    k: int = 64
    warps: int = 4
    stages: int = 3

    def columns(self, n: int) -> int:
        return self.n if n % self.n == 0 else self.n // 2


TILES = Tiles()


def _row_block(rows: int) -> int | None:
    """Rows a program takes at once: all of them up to LOOP_ROWS, else the largest of DOT_ROWS dividing them."""
    if rows <= LOOP_ROWS:
        return rows
    return next((block for block in reversed(DOT_ROWS) if rows % block == 0), None)


def supports(x, w, tiles: Tiles = TILES) -> bool:
    """Rows up to LOOP_ROWS or a multiple of 16; D and w's columns whole tiles."""
    (B, D), N = x.shape, w.shape[1]
    return _row_block(B) is not None and D % tiles.k == 0 and N % tiles.columns(N) == 0 and w.shape[0] == D


def _gelu(y):
    """GELU's tanh form (jax.nn.gelu(approximate=True))."""
    return 0.5 * y * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (y + GELU_CUBIC * y * y * y)))


def _kernel(x_ref, delta_ref, scale_ref, bias_ref, w_ref, *outs, eps, gelu, tiles, block_n, loop_rows):
    f32 = jnp.float32
    sum_ref, y_ref = outs if delta_ref is not None else (None, outs[0])
    D = x_ref.shape[-1]
    steps = D // tiles.k
    row_sets = list(range(x_ref.shape[0])) if loop_rows else [pl.ds(0, x_ref.shape[0])]

    def residual(rows, cols):
        """The residual sum's slice, rounded to x's dtype, as float32."""
        s = x_ref[rows, cols].astype(f32)
        if delta_ref is not None:
            s = (s + delta_ref[rows, cols].astype(f32)).astype(x_ref.dtype).astype(f32)
        return s

    def columns(i):
        return pl.ds(pl.multiple_of(i * tiles.k, tiles.k), tiles.k)

    def moments(i, sums):
        cols = columns(i)
        out = []
        for rows, (total, squares) in zip(row_sets, sums):
            s = residual(rows, cols)
            out.append((total + jnp.sum(s, axis=-1), squares + jnp.sum(s * s, axis=-1)))
        return out

    zero = jnp.zeros((), f32) if loop_rows else jnp.zeros((x_ref.shape[0],), f32)
    sums = lax.fori_loop(0, steps, moments, [(zero, zero)] * len(row_sets))
    stats = []
    for total, squares in sums:
        mean = total / D
        rstd = lax.rsqrt(jnp.maximum(squares / D - mean * mean, 0.0) + eps)
        stats.append((mean, rstd) if loop_rows else (mean[:, None], rstd[:, None]))
    first = pl.program_id(0) == 0

    def product(i, accs):
        cols = columns(i)
        w = w_ref[cols, :]
        scale, bias = scale_ref[cols], bias_ref[cols]
        out = []
        for rows, (mean, rstd), acc in zip(row_sets, stats, accs):
            s = residual(rows, cols)
            if sum_ref is not None:
                @pl.when(first)
                def _():
                    sum_ref[rows, cols] = s.astype(sum_ref.dtype)
            h = ((s - mean) * (rstd * scale) + bias).astype(x_ref.dtype)
            if loop_rows:  # element-wise, summed over k once the loop ends
                out.append(acc + h.astype(f32)[:, None] * w.astype(f32))
            else:
                out.append(acc + plgpu_triton.dot(h, w.astype(h.dtype)))
        return out

    shape = (tiles.k, block_n) if loop_rows else (x_ref.shape[0], block_n)
    accs = lax.fori_loop(0, steps, product, [jnp.zeros(shape, f32)] * len(row_sets))
    for rows, acc in zip(row_sets, accs):
        y = jnp.sum(acc, axis=0) if loop_rows else acc
        if gelu:  # on the product rounded to x's dtype, as the XLA step's activation
            y = _gelu(y.astype(y_ref.dtype).astype(f32))
        y_ref[rows, :] = y.astype(y_ref.dtype)


def norm_product(x, delta, scale, bias, w, *, eps, gelu=False, interpret=False, tiles: Tiles = TILES):
    """``(s, y)``: ``s = x + delta`` in x's dtype (None when delta is None: x is the sum) and
    ``y = LayerNorm(s) @ w`` (GELU's tanh form of it with ``gelu``) in x's dtype, float32 accumulation.

    x, delta ``[B, D]``; scale, bias ``[D]`` (the LayerNorm's); w ``[D, N]``.
    """
    if x.ndim != 2 or not supports(x, w, tiles) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"norm_product: x [B, D] needs B <= {LOOP_ROWS} or a multiple of 16, D a multiple of "
                         f"{tiles.k}, w [D, N] with N a multiple of {tiles.columns(1)} and delta x's shape; got x {x.shape}, "
                         f"w {w.shape}, delta {None if delta is None else delta.shape}")
    (B, D), N = x.shape, w.shape[1]
    block, block_n = _row_block(B), tiles.columns(N)
    rows_spec = pl.BlockSpec((block, D), lambda j, r: (r, 0))
    vector = pl.BlockSpec((D,), lambda j, r: (0,))
    out_shape = [jax.ShapeDtypeStruct((B, N), x.dtype)]
    out_specs = [pl.BlockSpec((block, block_n), lambda j, r: (r, j))]
    if delta is not None:
        out_shape.insert(0, jax.ShapeDtypeStruct((B, D), x.dtype))
        out_specs.insert(0, rows_spec)
    outs = pl.pallas_call(
        functools.partial(_kernel, eps=eps, gelu=gelu, tiles=tiles, block_n=block_n, loop_rows=B <= LOOP_ROWS),
        grid=(N // block_n, B // block),
        in_specs=[rows_spec, None if delta is None else rows_spec, vector, vector,
                  pl.BlockSpec((D, block_n), lambda j, r: (0, j))],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params(tiles.warps, tiles.stages), interpret=interpret,
        name="norm_gelu_product" if gelu else "norm_product",
    )(x, delta, scale.astype(jnp.float32), bias.astype(jnp.float32), w)
    return (None, *outs) if delta is None else tuple(outs)
