"""Next-token cross-entropy that never holds the full [tokens, vocab] logits at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden, embedding, targets, *, chunk: int):
    """Mean NLL of `targets` [B, T] under logits = hidden [B, T, D] @ embedding[V, D]^T.

    The token axis is cut into slices of `chunk` tokens; each slice's logits are computed in float32
    accumulation, reduced to a log-sum-exp and dropped, and recomputed in the backward pass
    (jax.checkpoint), so peak memory holds one slice of logits instead of all of them.
    """
    B, T, D = hidden.shape
    n = B * T
    h = hidden.reshape(n, D)
    y = targets.reshape(n)
    chunk = min(chunk, n)
    pad = (-n) % chunk
    h = jnp.pad(h, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad))
    valid = jnp.arange(n + pad) < n
    w = embedding.astype(hidden.dtype)

    @jax.checkpoint
    def slice_nll(h_s, y_s):
        logits = jnp.einsum("nd,vd->nv", h_s, w, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, y_s[:, None], axis=1)[:, 0]
        return jax.nn.logsumexp(logits, axis=1) - picked

    def body(total, xs):
        h_s, y_s, m_s = xs
        return total + jnp.sum(jnp.where(m_s, slice_nll(h_s, y_s), 0.0)), None

    xs = (h.reshape(-1, chunk, D), y.reshape(-1, chunk), valid.reshape(-1, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total / n
