"""AdamW with warm-up, cosine decay, clipping, decay on matrices only, and a guard against non-finite steps."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.min_lr_ratio,
    )


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """`apply_if_finite` skips (and counts) any update whose gradients are not finite; the loop stops
    after `train.max_nonfinite` in a row, so the count limit inside Optax is never reached."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # nanoGPT: dim >= 2 decays
    adamw = optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(learning_rate_schedule(train), b1=train.beta1, b2=train.beta2, eps=train.eps,
                    weight_decay=train.weight_decay, mask=decay_mask),
    )
    return optax.apply_if_finite(adamw, max_consecutive_errors=2**31 - 1)
