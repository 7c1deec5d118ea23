"""The norms: the gated RMSNorm after the recurrence (FLA's FusedRMSNormGated), the formula in XLA and on
one GPU ``kernels.gated_norm`` (one pass forward, one backward); and the blocks' LayerNorms with the
residual stream in ``kernels.layer_norm`` (where the model's ``layer_norm_impl`` asks; otherwise the blocks
run Flax's LayerNorm)."""

import functools

import jax
import jax.numpy as jnp

from kernels import gated_norm, layer_norm

from .dispatch import gated_norm_applies


def gated_rms_norm(x, weight, gate=None, *, eps, impl="auto"):
    """``x * rsqrt(mean(x^2) + eps) * weight``, times ``silu(gate)`` when given, over the last axis, in
    float32; returned in x's dtype. x and gate ``[..., D]``, weight ``[D]``. The kernel takes gated calls
    whose rows it supports; the rest run the formula in XLA."""
    rows = x.reshape(-1, x.shape[-1])
    if gate is not None and gated_norm_applies(impl, rows):
        out = _gated_norm(rows, gate.reshape(rows.shape), weight, eps, jax.default_backend() != "gpu")
        return out.reshape(x.shape)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * weight
    if gate is not None:
        y = y * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated_norm(x, gate, weight, eps, interpret):
    return gated_norm.gated_norm_forward(x, gate.astype(x.dtype), weight, eps=eps, interpret=interpret)


def _gated_norm_fwd(x, gate, weight, eps, interpret):
    return _gated_norm(x, gate, weight, eps, interpret), (x, gate, weight)


def _gated_norm_bwd(eps, interpret, residuals, dout):
    x, gate, weight = residuals
    dx, dgate, dweight = gated_norm.gated_norm_backward(x, gate.astype(x.dtype), weight, dout, eps=eps,
                                                        interpret=interpret)
    return dx, dgate.astype(gate.dtype), dweight.astype(weight.dtype)


_gated_norm.defvjp(_gated_norm_fwd, _gated_norm_bwd)


def residual_layer_norm(x, residual, scale, bias, *, eps):
    """``(x + residual, LayerNorm(x + residual))`` over the last axis by ``kernels.layer_norm`` (interpret
    mode off the GPU); with ``residual`` None, ``(x, LayerNorm(x))``. Returning the sum (or x) lets the
    backward add the residual stream's gradient in the same pass. Callers check ``dispatch.layer_norm_applies``."""
    shape, D = x.shape, x.shape[-1]
    outputs = _layer_norm(x.reshape(-1, D), None if residual is None else residual.reshape(-1, D), scale, bias,
                          eps, jax.default_backend() != "gpu")
    return tuple(o.reshape(shape) for o in outputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _layer_norm(x, residual, scale, bias, eps, interpret):
    return layer_norm.layer_norm_forward(x, residual, scale, bias, eps=eps, interpret=interpret)


def _layer_norm_fwd(x, residual, scale, bias, eps, interpret):
    return _layer_norm(x, residual, scale, bias, eps, interpret), (x, residual, scale, bias)


def _layer_norm_bwd(eps, interpret, residuals, grads):
    x, residual, scale, bias = residuals
    dsum, dout = grads
    dx, dscale, dbias = layer_norm.layer_norm_backward(x, residual, scale, dsum, dout, eps=eps, interpret=interpret)
    return dx, None if residual is None else dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
