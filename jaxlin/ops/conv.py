"""The layers' short causal convolutions: depthwise over time, SiLU after (FLA's ShortConvolution).

``causal_conv`` is the formula in XLA, for one input, with an optional cache of past inputs (decoding).
``conv_and_split`` takes the layers' joined input projection ``y = x @ [W_q | W_k | W_v | ...]``, convolves
its q|k|v columns and splits off the rest; where ``dispatch`` says, it runs ``kernels.short_conv``, whose backward writes
``y``'s gradient in one pass instead of XLA's three (see there).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import short_conv

from . import context_parallel
from .dispatch import elementwise_kernels_apply


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
    if cache is None and not return_cache and context_parallel.split():
        return context_parallel.causal_conv(_conv_after, x, kernel, segment_ids, width), None
    past = jnp.zeros((B, width - 1, C), x.dtype) if cache is None else cache.astype(x.dtype)
    keep = None if segment_ids is None else _keep_masks(segment_ids, width)
    y = _conv_silu(x, past, kernel, keep)
    if not return_cache:
        return y, None
    new_cache = jnp.concatenate([past, x], axis=1)[:, -(width - 1):]
    if segment_ids is not None:
        # Keep only inputs from the last token's document: a continuation belongs to it.
        same_doc = extend_segments(segment_ids, width - 1)[:, -(width - 1):] == segment_ids[:, -1:]
        new_cache = jnp.where(same_doc[..., None], new_cache, 0)
    return y, new_cache


def _keep_masks(segment_ids, width, past_ids=None):
    """keep[j] [B, T]: tap j (reading token t - (width-1-j)) lies in token t's document. `past_ids`: the ids
    of the width - 1 tokens before (default: the first token's document)."""
    if past_ids is None:
        seg = extend_segments(segment_ids, width - 1)
    else:
        seg = jnp.concatenate([past_ids, segment_ids], axis=1)
    return jnp.stack([seg[:, j : j + segment_ids.shape[1]] == segment_ids for j in range(width)])


def _conv_after(x, past, kernel, past_ids, segment_ids):
    """The convolution of x given the inputs before it, `past` [B, width-1, C], and their segment ids."""
    return _conv_silu(x, past.astype(x.dtype), kernel, _keep_masks(segment_ids, kernel.shape[0], past_ids))


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


def split_channels(y, widths):
    """y [..., sum(widths)] -> one array per width, in order."""
    return jnp.split(y, np.cumsum(widths)[:-1], axis=-1)


def conv_and_split(y, kernels, rest_widths, *, segment_ids=None, impl="auto"):
    """``(convolved, rest)``: y [B, T, sum(conv widths) + sum(rest_widths)] split by columns into one
    piece per kernel [width, channels], each convolved (``causal_conv``, no cache), then the
    ``rest_widths`` pieces as they are."""
    if not elementwise_kernels_apply(impl):
        pieces = split_channels(y, [k.shape[1] for k in kernels] + list(rest_widths))
        convolved = (causal_conv(x, k, segment_ids=segment_ids)[0] for x, k in zip(pieces, kernels))
        return tuple(convolved), tuple(pieces[len(kernels):])
    outputs = _conv_and_split(y, jnp.concatenate(kernels, axis=1), segment_ids,
                              tuple(k.shape[1] for k in kernels), tuple(rest_widths),
                              jax.default_backend() != "gpu")
    return outputs[:len(kernels)], outputs[len(kernels):]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_and_split(y, kernel, segment_ids, conv_widths, rest_widths, interpret):
    convolved = short_conv.conv_forward(y, kernel, conv_widths, segment_ids, interpret=interpret)
    return (*convolved, *split_channels(y, list(conv_widths) + list(rest_widths))[len(conv_widths):])


def _conv_and_split_fwd(y, kernel, segment_ids, conv_widths, rest_widths, interpret):
    return _conv_and_split(y, kernel, segment_ids, conv_widths, rest_widths, interpret), (y, kernel, segment_ids)


def _conv_and_split_bwd(conv_widths, rest_widths, interpret, residuals, grads):
    y, kernel, segment_ids = residuals
    dy, dkernel = short_conv.conv_join_backward(y, kernel, grads[:len(conv_widths)], grads[len(conv_widths):],
                                                segment_ids, interpret=interpret)
    return dy, dkernel.astype(kernel.dtype), None


_conv_and_split.defvjp(_conv_and_split_fwd, _conv_and_split_bwd)
