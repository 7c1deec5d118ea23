"""The gated RMSNorm after the recurrence (FLA's FusedRMSNormGated): the formula in XLA, and on one GPU
``kernels.gated_norm`` (one pass forward, one backward)."""

import functools

import jax
import jax.numpy as jnp

from .conv import kernels_apply


def gated_rms_norm(x, weight, gate=None, *, eps, impl="auto"):
    """``x * rsqrt(mean(x^2) + eps) * weight``, times ``silu(gate)`` when given, over the last axis, in
    float32; returned in x's dtype. x and gate ``[..., D]``, weight ``[D]``."""
    if gate is not None and kernels_apply(impl) and x.size % (x.shape[-1] * 64) == 0:
        D = x.shape[-1]
        out = _gated_norm(x.reshape(-1, D), gate.reshape(-1, D), weight, eps, jax.default_backend() != "gpu")
        return out.reshape(x.shape)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * weight
    if gate is not None:
        y = y * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated_norm(x, gate, weight, eps, interpret):
    from kernels import gated_norm
    return gated_norm.gated_norm_forward(x, gate.astype(x.dtype), weight, eps=eps, interpret=interpret)


def _gated_norm_fwd(x, gate, weight, eps, interpret):
    return _gated_norm(x, gate, weight, eps, interpret), (x, gate, weight)


def _gated_norm_bwd(eps, interpret, residuals, dout):
    from kernels import gated_norm
    x, gate, weight = residuals
    dx, dgate, dweight = gated_norm.gated_norm_backward(x, gate.astype(x.dtype), weight, dout, eps=eps,
                                                        interpret=interpret)
    return dx, dgate.astype(gate.dtype), dweight.astype(weight.dtype)


_gated_norm.defvjp(_gated_norm_fwd, _gated_norm_bwd)
