"""A decoding step's MLP in one kernel (Pallas, Triton lowering): the block's second LayerNorm, c_fc, GELU (tanh
form) and c_proj for a few rows, split over the hidden units.

At a few rows the MLP is two products that read 16 MB of weights (GPT-2 Medium, bf16) for a few kilobytes of
activations; under XLA they are two GEMMs, each a few microseconds of launch and pipeline fill, beside the
LayerNorm's small kernels. Here program j owns hidden units ``[j t, (j + 1) t)``: it normalises the rows
itself (they are a few kilobytes), loads those units' rows of c_fc's kernel (stored transposed, ``[F, D]``, so
that a unit's weights are contiguous; a column slice of ``[D, F]`` streamed at half the speed) and of c_proj's
``[F, D]`` whole, so that every load is in flight at once, and writes its share of the output,
``gelu(ln(x) w_fc[:, j]) w_proj[j]``, as float32 partial sums ``[F / t, rows, D]``. The caller sums them in the
residual add, which XLA fuses.

The rows are few, so the products run on the CUDA cores, a row at a time. Values are rounded to the weights'
dtype where the XLA block rounds them (the LayerNorm's output, c_fc's, GELU's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import compiler_params

MAX_ROWS = 8  # beyond, the rows' products belong on tensor cores (XLA's GEMMs)
HIDDEN_TILE = 32  # hidden units per program: 128 programs for GPT-2 Medium's 4,096


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(x, hidden_units: int) -> bool:
    """x ``[rows, D]``: at most MAX_ROWS rows, D a power of two, the hidden units a multiple of the tile."""
    rows, d = x.shape
    return rows <= MAX_ROWS and _power_of_two(d) and hidden_units % HIDDEN_TILE == 0


def _kernel(x_ref, scale_ref, bias_ref, w_fc_ref, w_proj_ref, out_ref, *, rows: int, eps: float, dtype):
    f32 = jnp.float32
    rounded = lambda v: v.astype(dtype).astype(f32)
    w_fc, w_proj = w_fc_ref[...], w_proj_ref[...]  # [t, D] each, in the weights' dtype until used
    scale, bias = scale_ref[...], bias_ref[...]
    for r in range(rows):
        x = x_ref[r, :].astype(f32)
        mean = jnp.mean(x)
        variance = jnp.maximum(jnp.mean(x * x) - mean * mean, 0.0)  # as Flax's LayerNorm (fast variance)
        normed = rounded((x - mean) * (jax.lax.rsqrt(variance + eps) * scale) + bias)
        hidden = rounded(jnp.sum(w_fc.astype(f32) * normed[None, :], axis=1))
        hidden = rounded(jax.nn.gelu(hidden, approximate=True))
        out_ref[r, :] = jnp.sum(hidden[:, None] * w_proj.astype(f32), axis=0)


def decode_mlp(x, ln_scale, ln_bias, w_fc_t, w_proj, *, eps: float, interpret: bool = False):
    """Partial sums ``[F / HIDDEN_TILE, rows, D]`` (float32) of ``gelu(layer_norm(x) @ w_fc_t.T) @ w_proj``: x
    ``[rows, D]``, ln_scale and ln_bias ``[D]``, c_fc's kernel transposed w_fc_t ``[F, D]`` and w_proj ``[F, D]``
    in the compute dtype."""
    if not supports(x, w_fc_t.shape[0]):
        raise ValueError(f"decode_mlp: unsupported x {x.shape} with {w_fc_t.shape[0]} hidden units: at most "
                         f"{MAX_ROWS} rows, a power-of-two width and hidden units a multiple of {HIDDEN_TILE}")
    rows, d = x.shape
    tiles = w_fc_t.shape[0] // HIDDEN_TILE
    f32 = jnp.float32
    whole = lambda a: pl.BlockSpec(a.shape, lambda j: (0,) * a.ndim)
    scale, bias = ln_scale.astype(f32), ln_bias.astype(f32)
    return pl.pallas_call(
        functools.partial(_kernel, rows=rows, eps=eps, dtype=w_fc_t.dtype), grid=(tiles,),
        in_specs=[whole(x), whole(scale), whole(bias), pl.BlockSpec((HIDDEN_TILE, d), lambda j: (j, 0)),
                  pl.BlockSpec((HIDDEN_TILE, d), lambda j: (j, 0))],
        out_specs=pl.BlockSpec((None, rows, d), lambda j: (j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((tiles, rows, d), f32),
        compiler_params=compiler_params(num_warps=8, num_stages=1), interpret=interpret, name="decode_mlp",
    )(x, scale, bias, w_fc_t, w_proj)
