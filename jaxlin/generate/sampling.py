"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k keeps the k likeliest tokens, top_p the smallest set of
    likeliest tokens whose probability reaches p (both after the temperature)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling(temperature=0.0)


def row_keys(seed: int, sample_ids) -> jax.Array:
    """One key per row from the seed and the row's sample number (not its place in the batch), so that a
    prompt's samples do not depend on which other prompts share the batch."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(sample_ids, jnp.uint32))


def sample(logits, keys, step, sampling: Sampling, vocab_size: int):
    """Next tokens [B] (int32) from logits [B, padded vocab]; columns past `vocab_size` are never chosen.
    `keys` [B] are the rows' keys, folded with the step number."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits.astype(jnp.float32), -jnp.inf)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < vocab_size:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # A token is kept when the likelier tokens before it hold less than top_p: at least the likeliest.
        kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < sampling.top_p, axis=-1)
        threshold = jnp.take_along_axis(ordered, kept[:, None] - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    step_keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)
