"""A one-row decoding step's MLP in one kernel (Pallas, Triton lowering): the block's second LayerNorm, c_fc,
GELU (tanh form) and c_proj, split over the hidden units.

At one row XLA's GPU compiler runs a product as a reduction, which took GPT-2 Medium's MLP (16 MB of weights in
bf16) about twice as long as its GEMMs at two rows. Here program j owns hidden units ``[j t, (j + 1) t)``:
it normalises the row itself (a few kilobytes), loads those units' rows of c_fc's kernel (stored transposed,
``[F, D]``, so that a unit's weights are contiguous) and of c_proj's ``[F, D]`` whole, so that every load is
in flight at once, and writes its share of the output, ``gelu(ln(x) w_fc[:, j]) w_proj[j]``, as float32 partial
sums ``[F / t, 1, D]``. The caller sums them in the residual add, which XLA fuses.

The products run on the CUDA cores. At two rows and more this streamed no faster than XLA's GEMMs, and it
slowed with every row (docs/generation.md), so it takes one row only. Values are rounded to the weights' dtype
where the XLA block rounds them (the LayerNorm's output, c_fc's, GELU's; the caller rounds the LayerNorm's
parameters, as Flax does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import compiler_params, is_power_of_two

HIDDEN_TILE = 32  # hidden units per program: 128 programs for GPT-2 Medium's 4,096
MAX_WIDTH = 1024  # a program holds two [HIDDEN_TILE, D] tiles in registers; measured at GPT-2 Medium's 1024


def supports(x, hidden_units: int) -> bool:
    """x ``[rows, D]``: one row, D a power of two up to MAX_WIDTH, the hidden units a multiple of the tile."""
    rows, d = x.shape
    return rows == 1 and is_power_of_two(d) and d <= MAX_WIDTH and hidden_units % HIDDEN_TILE == 0


def layer_norm_row(x, scale, bias, eps: float, dtype):
    """A block's LayerNorm of one row ``x [D]`` (float32) as Flax's (its fast variance), rounded to ``dtype``
    (returned in float32)."""
    mean = jnp.mean(x)
    variance = jnp.maximum(jnp.mean(x * x) - mean * mean, 0.0)
    normed = (x - mean) * (jax.lax.rsqrt(variance + eps) * scale) + bias
    return normed.astype(dtype).astype(jnp.float32)


def _kernel(x_ref, scale_ref, bias_ref, w_fc_ref, w_proj_ref, out_ref, *, eps: float, dtype):
    f32 = jnp.float32
    rounded = lambda v: v.astype(dtype).astype(f32)
    normed = layer_norm_row(x_ref[0, :].astype(f32), scale_ref[...], bias_ref[...], eps, dtype)
    hidden = rounded(jnp.sum(w_fc_ref[...].astype(f32) * normed[None, :], axis=1))  # [t]
    hidden = rounded(jax.nn.gelu(hidden, approximate=True))
    out_ref[0, :] = jnp.sum(hidden[:, None] * w_proj_ref[...].astype(f32), axis=0)


def decode_mlp(x, ln_scale, ln_bias, w_fc_t, w_proj, *, eps: float, interpret: bool = False):
    """Partial sums ``[F / HIDDEN_TILE, 1, D]`` (float32) of ``gelu(layer_norm(x) @ w_fc_t.T) @ w_proj``: x
    ``[1, D]``, ln_scale and ln_bias ``[D]``, c_fc's kernel transposed w_fc_t ``[F, D]`` and w_proj ``[F, D]``
    in the compute dtype."""
    if not supports(x, w_fc_t.shape[0]):
        raise ValueError(f"decode_mlp: unsupported x {x.shape} with {w_fc_t.shape[0]} hidden units: one row, a "
                         f"power-of-two width up to {MAX_WIDTH} and hidden units a multiple of {HIDDEN_TILE}")
    d = x.shape[1]
    tiles = w_fc_t.shape[0] // HIDDEN_TILE
    f32 = jnp.float32
    whole = lambda a: pl.BlockSpec(a.shape, lambda j: (0,) * a.ndim)
    units = pl.BlockSpec((HIDDEN_TILE, d), lambda j: (j, 0))
    scale, bias = ln_scale.astype(f32), ln_bias.astype(f32)
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, dtype=w_fc_t.dtype), grid=(tiles,),
        in_specs=[whole(x), whole(scale), whole(bias), units, units],
        out_specs=pl.BlockSpec((None, 1, d), lambda j: (j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((tiles, 1, d), f32),
        compiler_params=compiler_params(num_warps=8, num_stages=1), interpret=interpret, name="decode_mlp",
    )(x, scale, bias, w_fc_t, w_proj)
