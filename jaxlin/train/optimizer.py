"""AdamW with warm-up, cosine decay, clipping, decay on matrices only, and a guard against non-finite steps."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.min_lr_ratio,
    )


class GuardedState(NamedTuple):
    inner: Any
    notfinite_count: jax.Array  # non-finite steps in a row
    total_notfinite: jax.Array
    grad_norm: jax.Array  # of the last gradients, before clipping


def clip_and_skip_nonfinite(inner: optax.GradientTransformation, max_norm: float) -> optax.GradientTransformation:
    """Clips to `max_norm` and skips (and counts) any step whose gradients are not finite, from one global
    norm. `optax.clip_by_global_norm` inside `optax.apply_if_finite` does the same from three reductions
    of every gradient (the norm, the finiteness check and the logged norm): about 1,300 small kernels a
    step for GPT-2 Medium, each followed by a launch gap. A gradient is non-finite exactly when its squared
    norm is (inf or NaN; finite squares too large for float32 count as non-finite too)."""

    def init(params):
        count = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the train step donates them
        return GuardedState(inner.init(params), count(), count(), jnp.zeros((), jnp.float32))

    def update(grads, state, params=None):
        norm = optax.tree.norm(grads)
        finite = jnp.isfinite(norm)
        scale = jnp.where(finite, jnp.minimum(1.0, max_norm / norm), 0.0)
        clipped = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        updates, inner_state = inner.update(clipped, state.inner, params)
        keep = lambda new, old: jnp.where(finite, new, old)  # element-wise: fuses into the update kernels
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        inner_state = jax.tree.map(keep, inner_state, state.inner)
        count = jnp.where(finite, 0, state.notfinite_count + 1)
        return updates, GuardedState(inner_state, count, state.total_notfinite + (~finite), norm)

    return optax.GradientTransformation(init, update)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW behind `clip_and_skip_nonfinite`; the loop stops after `train.max_nonfinite` skipped steps in
    a row."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # nanoGPT: dim >= 2 decays
    adamw = optax.adamw(learning_rate_schedule(train), b1=train.beta1, b2=train.beta2, eps=train.eps,
                        weight_decay=train.weight_decay, mask=decay_mask)
    return clip_and_skip_nonfinite(adamw, train.grad_clip)
