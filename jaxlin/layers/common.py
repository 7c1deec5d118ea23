"""Pieces shared by the attention layers: projections, short causal convolution, gated RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

INIT_STD = 0.02  # nanoGPT's initialisation for every Linear and Embedding
# Element-wise results that feed a matrix product (norm outputs, the MLP activation, the short convs'
# outputs): the "dots_and_activations" remat policy (jaxlin.model) stores them instead of recomputing.
ACTIVATION_NAME = "activation"


def activation(x):
    return checkpoint_name(x, ACTIVATION_NAME)


def linear(d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs, std: float = INIT_STD, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros, rngs=rngs,
    )


def extend_segments(segment_ids: jax.Array, n_past: int) -> jax.Array:
    """Prepends `n_past` ids for the cached tokens: they continue the first token's document."""
    first = jnp.broadcast_to(segment_ids[:, :1], (segment_ids.shape[0], n_past))
    return jnp.concatenate([first, segment_ids], axis=1)


def causal_conv(x, kernel, *, segment_ids=None, cache=None, return_cache=False):
    """Depthwise causal convolution + SiLU of x [B, T, C] with kernel [width, C], in float32.

    cache [B, width-1, C] holds the inputs that precede x; taps reaching into another document (by
    `segment_ids`) read zero. Returns (y in x's dtype, the new cache or None).
    """
    B, T, C = x.shape
    width = kernel.shape[0]
    past = jnp.zeros((B, width - 1, C), x.dtype) if cache is None else cache.astype(x.dtype)
    seg = None if segment_ids is None else extend_segments(segment_ids, width - 1)
    # keep[j]: tap j (reading token t - (width-1-j)) lies in token t's document
    keep = None if seg is None else jnp.stack([seg[:, j : j + T] == segment_ids for j in range(width)])
    y = _conv_silu(x, past, kernel, keep)
    if not return_cache:
        return y, None
    new_cache = jnp.concatenate([past, x], axis=1)[:, -(width - 1):]
    if segment_ids is not None:
        # Keep only inputs from the last token's document: a continuation belongs to it.
        same_doc = seg[:, -(width - 1):] == segment_ids[:, -1:]
        new_cache = jnp.where(same_doc[..., None], new_cache, 0)
    return y, new_cache


def _taps(x, past, keep, width):
    """The width shifted views of [past, x] (float32), each masked by its `keep` row."""
    xp = jnp.concatenate([past, x], axis=1)
    T = x.shape[1]
    for j in range(width):
        tap = xp[:, j : j + T].astype(jnp.float32)
        yield tap if keep is None else jnp.where(keep[j][..., None], tap, 0.0)


def _pre_activation(x, past, kernel, keep):
    width = kernel.shape[0]
    return sum(tap * kernel[j].astype(jnp.float32) for j, tap in enumerate(_taps(x, past, keep, width)))


@jax.custom_vjp
def _conv_silu(x, past, kernel, keep):
    return jax.nn.silu(_pre_activation(x, past, kernel, keep)).astype(x.dtype)


def _conv_silu_fwd(x, past, kernel, keep):
    return _conv_silu(x, past, kernel, keep), (x, past, kernel, keep)


def _conv_silu_bwd(residuals, dy):
    """Autodiff of the float32 formula would store the pre-activation's gradient in float32 for its
    two readers (the input's and the kernel's gradient); it is stored in x's dtype instead, as autocast
    does in the reference, which halves the traffic of this, the layer's largest element-wise step."""
    x, past, kernel, keep = residuals
    width = kernel.shape[0]
    pre = _pre_activation(x, past, kernel, keep)
    s = jax.nn.sigmoid(pre)
    dpre = (dy.astype(jnp.float32) * s * (1.0 + pre * (1.0 - s))).astype(x.dtype)
    # The barrier stops XLA from dropping the rounding (excess precision) and storing float32 again.
    dpre = jax.lax.optimization_barrier(dpre).astype(jnp.float32)
    dxp, dkernel = 0.0, []
    for j, tap in enumerate(_taps(x, past, keep, width)):
        d = dpre if keep is None else jnp.where(keep[j][..., None], dpre, 0.0)
        dxp = dxp + jnp.pad(d * kernel[j].astype(jnp.float32), ((0, 0), (j, width - 1 - j), (0, 0)))
        dkernel.append(jnp.sum(d * tap, axis=(0, 1)))
    dxp = dxp.astype(x.dtype)
    return dxp[:, width - 1:], dxp[:, :width - 1], jnp.stack(dkernel).astype(kernel.dtype), None


_conv_silu.defvjp(_conv_silu_fwd, _conv_silu_bwd)


class ShortConv(nnx.Module):
    """The parameter of FLA's ShortConvolution (depthwise, no bias, SiLU after), stored as [width, channels].

    PyTorch's default Conv1d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = width for depthwise.
    """

    def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs):
        bound = width ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound))


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
        return activation(y.astype(x.dtype))


def split_heads(x, n_head: int):
    return x.reshape(*x.shape[:-1], n_head, x.shape[-1] // n_head)


def merge_heads(x):
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class QKVConv(nnx.Module):
    """The three short convolutions FLA puts on q, k and v; state carries each one's cache under "q",
    "k" and "v". Each reads its columns of the joined q|k|v product and writes its own output, which
    the kernels take as they are (one convolution over the joined channels would need a copy to split)."""

    def __init__(self, key_dim: int, value_dim: int, width: int, *, rngs: nnx.Rngs):
        self.q = ShortConv(key_dim, width, rngs=rngs)
        self.k = ShortConv(key_dim, width, rngs=rngs)
        self.v = ShortConv(value_dim, width, rngs=rngs)

    def __call__(self, qkv, *, segment_ids=None, cache=None, return_cache=False):
        """qkv [B, T, 2 key_dim + value_dim] -> ((q, k, v), new cache)."""
        convs = {"q": self.q, "k": self.k, "v": self.v}
        inputs = split_channels(qkv, [c.kernel.shape[1] for c in convs.values()])
        outputs, new_cache = [], {}
        for (name, conv), x in zip(convs.items(), inputs):
            y, new_cache[name] = causal_conv(x, conv.kernel[...], segment_ids=segment_ids,
                                             cache=cache[name] if cache else None, return_cache=return_cache)
            outputs.append(activation(y))
        return tuple(outputs), new_cache if return_cache else {}


def split_channels(y, widths):
    """y [..., sum(widths)] -> one array per width, in order."""
    return jnp.split(y, np.cumsum(widths)[:-1], axis=-1)


def fused_linear(x, *layers: nnx.Linear):
    """Several bias-free projections of one input as one matrix product, their outputs joined along the
    last axis: one kernel, and one product for the input's gradient, instead of one per projection."""
    kernel = jnp.concatenate([layer.kernel[...] for layer in layers], axis=1).astype(layers[0].dtype)
    return jnp.dot(x.astype(layers[0].dtype), kernel)


def project_qkv(layer: nnx.Module, x, *extra: nnx.Linear | None, segment_ids, state: dict, return_state: bool):
    """q, k, v of a linear-attention layer (its q/k/v projections, then the optional short convs)
    split into heads, the outputs of the `extra` bias-free projections of x (computed in the same
    matrix product; None for a None entry), and the convs' new cache."""
    qkv_layers = (layer.q_proj, layer.k_proj, layer.v_proj)
    present = [p for p in extra if p is not None]
    qkv_width = sum(p.out_features for p in qkv_layers)
    qkv, *present_out = split_channels(fused_linear(x, *qkv_layers, *present),
                                       [qkv_width] + [p.out_features for p in present])
    conv_cache = {}
    if layer.conv is not None:  # the conv reads q|k|v joined, as the product left them
        (q, k, v), conv_cache = layer.conv(qkv, segment_ids=segment_ids, cache=state.get("conv"),
                                           return_cache=return_state)
    else:
        q, k, v = split_channels(qkv, [p.out_features for p in qkv_layers])
    outputs = iter(present_out)
    extra_out = [None if p is None else next(outputs) for p in extra]
    return tuple(split_heads(t, layer.n_head) for t in (q, k, v)), extra_out, conv_cache
