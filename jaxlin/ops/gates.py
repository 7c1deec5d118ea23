"""GLA's forget gate ``log_sigmoid(h + bias) / normalizer``, in one pass each way.

Under autodiff of the float32 formula XLA stored the log-sigmoid in float32 for the gradient and reduced
the bias gradient in the compute dtype (bf16); the backward here reads the bf16 pre-activation and the
gate's gradient once, writes the pre-activation's gradient in the compute dtype, and sums the bias
gradient in float32.
"""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def log_sigmoid_gate(h, bias, normalizer: float):
    """``log_sigmoid(h + bias) / normalizer`` in h's dtype, formed in float32: h ``[..., K]``, bias ``[K]``."""
    return (jax.nn.log_sigmoid(_pre_activation(h, bias)) / normalizer).astype(h.dtype)


def _pre_activation(h, bias):
    return h.astype(jnp.float32) + bias.astype(jnp.float32)


def _forward(h, bias, normalizer):
    return log_sigmoid_gate(h, bias, normalizer), (h, bias)


def _backward(normalizer, residuals, dgate):
    h, bias = residuals
    # d log_sigmoid(z) / dz = sigmoid(-z), which stays accurate where sigmoid(z) rounds to 1.
    dz = dgate.astype(jnp.float32) * jax.nn.sigmoid(-_pre_activation(h, bias)) / normalizer
    # Summed over the leading axes in place: a reshape merging batch and time would gather a time axis that
    # is split over devices (context parallelism).
    dbias = jnp.sum(dz, axis=tuple(range(dz.ndim - 1)))
    return dz.astype(h.dtype), dbias.astype(bias.dtype)


log_sigmoid_gate.defvjp(_forward, _backward)
