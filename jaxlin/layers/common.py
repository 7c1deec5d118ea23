"""Pieces shared by the attention layers: projections, short causal convolution, gated RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02  # nanoGPT's initialisation for every Linear and Embedding


def linear(d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs, std: float = INIT_STD, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros, rngs=rngs,
    )


def extend_segments(segment_ids: jax.Array, n_past: int) -> jax.Array:
    """Prepends `n_past` ids for the cached tokens: they continue the first token's document."""
    first = jnp.broadcast_to(segment_ids[:, :1], (segment_ids.shape[0], n_past))
    return jnp.concatenate([first, segment_ids], axis=1)


class ShortConv(nnx.Module):
    """Depthwise causal 1-D convolution followed by SiLU (FLA's ShortConvolution, no bias).

    The kernel is stored as [width, channels]; positions that belong to another document
    (by `segment_ids`) are masked, so packed documents never see each other.
    """

    def __init__(self, channels: int, width: int, *, dtype, rngs: nnx.Rngs):
        # PyTorch's default Conv1d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = width for depthwise.
        bound = width ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound))
        self.width = width
        self.dtype = dtype

    def __call__(self, x, *, segment_ids=None, cache=None, return_cache=False):
        """x [B, T, C]; cache [B, width-1, C] holds the inputs that precede x. Returns (y, new_cache)."""
        B, T, C = x.shape
        w = self.kernel[...].astype(self.dtype)
        past = jnp.zeros((B, self.width - 1, C), x.dtype) if cache is None else cache.astype(x.dtype)
        xp = jnp.concatenate([past, x], axis=1)  # [B, width-1+T, C]
        seg = None if segment_ids is None else extend_segments(segment_ids, self.width - 1)
        y = jnp.zeros((B, T, C), jnp.float32)
        for j in range(self.width):
            shift = self.width - 1 - j  # tap j reads token t - shift
            tap = jax.lax.dynamic_slice_in_dim(xp, j, T, axis=1)
            if seg is not None and shift > 0:
                tap = jnp.where((seg[:, j : j + T] == segment_ids)[..., None], tap, 0)
            y = y + tap.astype(jnp.float32) * w[j].astype(jnp.float32)
        y = jax.nn.silu(y).astype(x.dtype)
        if not return_cache:
            return y, None
        new_cache = xp[:, -(self.width - 1):]
        if segment_ids is not None:
            # Keep only inputs from the last token's document: a continuation belongs to it.
            same_doc = seg[:, -(self.width - 1):] == segment_ids[:, -1:]
            new_cache = jnp.where(same_doc[..., None], new_cache, 0)
        return y, new_cache


class GatedRMSNorm(nnx.Module):
    """Per-head RMSNorm over the value dim, optionally gated by swish(gate) (FLA's FusedRMSNormGated)."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x, gate=None):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps) * self.weight[...]
        if gate is not None:
            y = y * jax.nn.silu(gate.astype(jnp.float32))
        return y.astype(x.dtype)


def split_heads(x, n_head: int):
    return x.reshape(*x.shape[:-1], n_head, x.shape[-1] // n_head)


def merge_heads(x):
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class QKVConv(nnx.Module):
    """The three short convolutions FLA puts on q, k and v; state carries each one's cache."""

    def __init__(self, key_dim: int, value_dim: int, width: int, *, dtype, rngs: nnx.Rngs):
        self.q = ShortConv(key_dim, width, dtype=dtype, rngs=rngs)
        self.k = ShortConv(key_dim, width, dtype=dtype, rngs=rngs)
        self.v = ShortConv(value_dim, width, dtype=dtype, rngs=rngs)

    def __call__(self, q, k, v, *, segment_ids=None, cache=None, return_cache=False):
        cache = cache or {}
        outs, new_cache = [], {}
        for name, conv, t in (("q", self.q, q), ("k", self.k, k), ("v", self.v, v)):
            y, new_cache[name] = conv(t, segment_ids=segment_ids, cache=cache.get(name), return_cache=return_cache)
            outs.append(y)
        return tuple(outs), new_cache


def project_qkv(layer: nnx.Module, x, *, segment_ids, state: dict, return_state: bool):
    """q, k, v of a linear-attention layer (its q/k/v projections, then the optional short convs),
    split into heads, and the convs' new cache."""
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    conv_cache = {}
    if layer.conv is not None:
        (q, k, v), conv_cache = layer.conv(
            q, k, v, segment_ids=segment_ids, cache=state.get("conv"), return_cache=return_state
        )
    return tuple(split_heads(t, layer.n_head) for t in (q, k, v)), conv_cache
