"""A decoding step's LayerNorm inside the product that reads it (Pallas, Triton lowering).

For the few rows of a decoding step, ``x [B, D]`` (the residual stream) and the last sublayer's output
``delta [B, D]``, one kernel writes the residual sum ``s = x + delta`` and ``act(LayerNorm(s) @ w)``. Under
XLA a step's LayerNorm took six kernels of about a microsecond each (the statistics' two reductions, casts,
the scaling, the residual add) beside each product that streams a layer's weights; those are latency, not
bandwidth, at a few kilobytes of rows.

A program owns ``tiles.n`` columns of ``w`` and loads them in ``tiles.k``-row slices (all of ``D`` at
GPT-2 Medium's width: one load in flight per program, no loop to wait on), with the rows of ``x`` and ``delta``;
it sums, normalises and multiplies each row in registers (element-wise products summed along ``k``: a few rows
would waste the tensor cores' 16-row tiles), and the first program also stores ``s``. Values are rounded where
the XLA step rounds them: ``s`` and the normed rows to x's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import compiler_params

MAX_ROWS = 8  # rows a program multiplies one at a time; more would want the tensor cores
GELU_CUBIC = 0.044715


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Columns of w a program owns (halved where they do not divide w's: GLA's joined kernel has 16 columns
    of its low-rank gate), rows of w it loads at a time, its warps and pipeline stages."""
    n: int = 32
    k: int = 1024
    warps: int = 4
    stages: int = 1

    def columns(self, n: int) -> int:
        return self.n if n % self.n == 0 else self.n // 2

    def depth(self, d: int) -> int:
        return min(self.k, d)


TILES = Tiles()


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(x, w, tiles: Tiles = TILES) -> bool:
    """Up to MAX_ROWS rows; D whole slices of a power of two; w's columns whole tiles."""
    (B, D), N = x.shape, w.shape[1]
    k = tiles.depth(D)
    return B <= MAX_ROWS and _power_of_two(k) and D % k == 0 and N % tiles.columns(N) == 0 and w.shape[0] == D


def _gelu(y):
    """GELU's tanh form (jax.nn.gelu(approximate=True))."""
    return 0.5 * y * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (y + GELU_CUBIC * y * y * y)))


def _kernel(x_ref, delta_ref, scale_ref, bias_ref, w_ref, *outs, eps, gelu, k):
    f32 = jnp.float32
    sum_ref, y_ref = outs if delta_ref is not None else (None, outs[0])
    rows, D = x_ref.shape
    steps = D // k

    def residual(row, cols):
        """A slice of a row's residual sum, rounded to x's dtype, as float32."""
        s = x_ref[row, cols].astype(f32)
        if delta_ref is not None:
            s = (s + delta_ref[row, cols].astype(f32)).astype(x_ref.dtype).astype(f32)
        return s

    def columns(i):
        return pl.ds(pl.multiple_of(i * k, k), k)

    def moments(i, sums):
        out = []
        for row, (total, squares) in enumerate(sums):
            s = residual(row, columns(i))
            out.append((total + jnp.sum(s), squares + jnp.sum(s * s)))
        return out

    zero = jnp.zeros((), f32)
    sums = lax.fori_loop(0, steps, moments, [(zero, zero)] * rows)
    stats = []
    for total, squares in sums:  # as Flax's LayerNorm: mean and mean square, the variance clipped at 0
        mean = total / D
        stats.append((mean, lax.rsqrt(jnp.maximum(squares / D - mean * mean, 0.0) + eps)))
    first = pl.program_id(0) == 0

    def product(i, accs):
        cols = columns(i)
        w = w_ref[cols, :].astype(f32)
        scale, bias = scale_ref[cols], bias_ref[cols]
        out = []
        for row, ((mean, rstd), acc) in enumerate(zip(stats, accs)):
            s = residual(row, cols)
            if sum_ref is not None:
                @pl.when(first)
                def _():
                    sum_ref[row, cols] = s.astype(sum_ref.dtype)
            h = ((s - mean) * (rstd * scale) + bias).astype(x_ref.dtype).astype(f32)
            out.append(acc + jnp.sum(h[:, None] * w, axis=0))
        return out

    accs = lax.fori_loop(0, steps, product, [jnp.zeros((w_ref.shape[1],), f32)] * rows)
    for row, y in enumerate(accs):
        if gelu:  # on the product rounded to x's dtype, as the XLA step's activation
            y = _gelu(y.astype(y_ref.dtype).astype(f32))
        y_ref[row, :] = y.astype(y_ref.dtype)


def norm_product(x, delta, scale, bias, w, *, eps, gelu=False, interpret=False, tiles: Tiles = TILES):
    """``(s, y)``: ``s = x + delta`` in x's dtype (None when delta is None: x is the sum) and
    ``y = LayerNorm(s) @ w`` (GELU's tanh form of it with ``gelu``) in x's dtype, float32 accumulation.

    x, delta ``[B, D]``; scale, bias ``[D]`` (the LayerNorm's); w ``[D, N]``.
    """
    if x.ndim != 2 or not supports(x, w, tiles) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"norm_product: x [B, D] needs B <= {MAX_ROWS}, D whole slices of {tiles.k} rows (or a "
                         f"power of two below), w [D, N] with N a multiple of {tiles.columns(1)} and delta x's "
                         f"shape; got x {x.shape}, w {w.shape}, delta {None if delta is None else delta.shape}")
    (B, D), N = x.shape, w.shape[1]
    block_n = tiles.columns(N)
    rows_spec = pl.BlockSpec((B, D), lambda j: (0, 0))
    vector = pl.BlockSpec((D,), lambda j: (0,))
    out_shape = [jax.ShapeDtypeStruct((B, N), x.dtype)]
    out_specs = [pl.BlockSpec((B, block_n), lambda j: (0, j))]
    if delta is not None:
        out_shape.insert(0, jax.ShapeDtypeStruct((B, D), x.dtype))
        out_specs.insert(0, rows_spec)
    outs = pl.pallas_call(
        functools.partial(_kernel, eps=eps, gelu=gelu, k=tiles.depth(D)),
        grid=(N // block_n,),
        in_specs=[rows_spec, None if delta is None else rows_spec, vector, vector,
                  pl.BlockSpec((D, block_n), lambda j: (0, j))],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params(tiles.warps, tiles.stages), interpret=interpret,
        name="norm_gelu_product" if gelu else "norm_product",
    )(x, delta, scale.astype(jnp.float32), bias.astype(jnp.float32), w)
    return (None, *outs) if delta is None else tuple(outs)
