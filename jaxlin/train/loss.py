"""Next-token cross-entropy that never holds the full [tokens, vocab] logits at once.

The token axis is cut into slices of `chunk` tokens. Each slice's logits are computed in the compute
dtype (float32 accumulation) from the hidden states and embedding, reduced to a log-sum-exp in float32
and dropped.
Under differentiation the same pass also forms the gradients (the softmax minus the one-hot target is
known as soon as a slice's logits are), so the backward pass only scales them: three matrix products
over the vocabulary per token instead of four (forward, recomputed forward, two gradients), all in the
compute dtype with float32 accumulation, as PyTorch autocast runs the reference's head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlin.ops import context_parallel
from jaxlin.ops.mesh_axes import batch_axes


def chunked_cross_entropy(hidden, embedding, targets, *, chunk: int):
    """Mean NLL of `targets` [B, T] under logits = hidden [B, T, D] @ embedding[V, D]^T.

    Under a mesh each device runs the slice loop over its own tokens (`shard_map`; the batch axis split
    over `jaxlin.ops.mesh_axes.batch_axes()`, the time axis over `sequence` when it splits sequences): left to
    the partitioner, a loop over slices of the sharded token axis moves hidden states between devices and
    all-reduces the embedding gradient at every slice.
    """
    axes = batch_axes()
    time_axis = context_parallel.AXIS if context_parallel.applies() else None
    if not axes and time_axis is None:
        return _nll_total(hidden, embedding, targets, chunk) / targets.size
    rows = P(axes or None, time_axis)
    per_device = jax.shard_map(lambda h, w, y: _nll_total(h, w, y, chunk)[None, None], in_specs=(rows, P(), rows),
                               out_specs=rows, axis_names={*axes, *([time_axis] if time_axis else [])},
                               check_vma=False)
    return jnp.sum(per_device(hidden, embedding, targets)) / targets.size


def _nll_total(hidden, embedding, targets, chunk):
    B, T, D = hidden.shape
    n = B * T
    chunk = min(chunk, n)
    pad = (-n) % chunk
    h = jnp.pad(hidden.reshape(n, D), ((0, pad), (0, 0))).reshape(-1, chunk, D)
    y = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)
    valid = (jnp.arange(n + pad) < n).reshape(-1, chunk)
    return _nll_sum(h, embedding, y, valid)


def _slice_logits(h_s, w):
    """In the compute dtype (float32 accumulation), as autocast gives the reference's logits: the three
    passes over them (max, sum of exponentials, gradient) then move half the bytes of float32 logits.
    The log-sum-exp and the gradient are still formed in float32."""
    logits = jnp.einsum("nd,vd->nv", h_s, w.astype(h_s.dtype), preferred_element_type=h_s.dtype)
    # Without the barrier XLA may fold the readers' upcast into the product and store float32 after all.
    return jax.lax.optimization_barrier(logits)


def _slice_terms(h_s, w, y_s, valid_s):
    """(the slice's summed NLL, its logits, their log-sum-exp [C, 1], the one-hot targets [C, V])."""
    logits = _slice_logits(h_s, w).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=1, keepdims=True)
    is_target = jnp.arange(logits.shape[1])[None, :] == y_s[:, None]
    picked = jnp.sum(jnp.where(is_target, logits, 0.0), axis=1)
    return jnp.sum(jnp.where(valid_s, lse[:, 0] - picked, 0.0)), logits, lse, is_target


@jax.custom_vjp
def _nll_sum(h, embedding, y, valid):
    """Summed NLL over slices: h [S, C, D], y and valid [S, C]."""

    def body(total, xs):
        return total + _slice_terms(xs[0], embedding, *xs[1:])[0], None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, y, valid))[0]


def _nll_sum_fwd(h, embedding, y, valid):
    w = embedding.astype(h.dtype)

    def body(carry, xs):
        total, dw = carry
        h_s, y_s, valid_s = xs
        nll, logits, lse, is_target = _slice_terms(h_s, w, y_s, valid_s)
        # d(sum NLL)/d logits = softmax - one_hot, zero on padding: one element-wise pass over the logits
        # straight into the compute dtype, in which the two products below run.
        dlogits = jnp.where(valid_s[:, None], jnp.exp(logits - lse) - is_target, 0.0).astype(h.dtype)
        dh_s = jnp.einsum("nv,vd->nd", dlogits, w, preferred_element_type=jnp.float32).astype(h.dtype)
        dw += jnp.einsum("nv,nd->vd", dlogits, h_s, preferred_element_type=jnp.float32)
        return (total + nll, dw), dh_s

    init = (jnp.zeros((), jnp.float32), jnp.zeros(embedding.shape, jnp.float32))
    (total, dw), dh = jax.lax.scan(body, init, (h, y, valid))
    return total, (dh, dw.astype(embedding.dtype))


def _nll_sum_bwd(residuals, cotangent):
    dh, dw = residuals
    return (dh * cotangent).astype(dh.dtype), (dw * cotangent).astype(dw.dtype), None, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)
