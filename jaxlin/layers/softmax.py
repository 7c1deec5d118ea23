"""nanoGPT's causal self-attention, the softmax baseline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin.layers.common import linear, merge_heads, split_heads
from jaxlin.ops.attention import causal_attention


class CausalSelfAttention(nnx.Module):
    """``impl``: ModelConfig.attention_impl, see jaxlin.ops.attention."""

    def __init__(self, d_model: int, n_head: int, *, out_std: float, dtype=jnp.bfloat16, rngs: nnx.Rngs,
                 impl: str = "auto"):
        if d_model % n_head:
            raise ValueError(f"softmax attention: d_model={d_model} must be divisible by n_head={n_head}")
        self.n_head, self.impl = n_head, impl
        self.c_attn = linear(d_model, 3 * d_model, dtype=dtype, rngs=rngs)
        self.c_proj = linear(d_model, d_model, dtype=dtype, rngs=rngs, std=out_std)

    def __call__(self, x, *, segment_ids=None, state=None, return_state=False):
        """With `state` (a KV cache from `init_cache`), x's tokens continue the cache: the new state is
        the cache with them written in. Without, the tokens attend among themselves (per document)."""
        q, k, v = (split_heads(t, self.n_head) for t in jnp.split(self.c_attn(x), 3, axis=-1))
        if state is not None:
            o, state = self._attend_cache(q, k, v, state)
            return self.c_proj(merge_heads(o)), state
        if return_state:
            raise ValueError("softmax attention continues from a KV cache: pass state=layer.init_cache(...)")
        o = causal_attention(q, k, v, segment_ids=segment_ids, impl=self.impl)
        return self.c_proj(merge_heads(o)), None

    def init_cache(self, start, size: int) -> dict:
        """An empty KV cache of `size` slots for rows whose tokens begin at slot `start` [B] (slots before
        it hold left padding, which no token reads); "length" counts the slots written. Keys and values are
        [B, H, slots, D]: (batch, head) lead, as the products over the cache batch them, so that no step
        transposes the cache."""
        d_head = self.c_attn.in_features // self.n_head
        kv = jnp.zeros((start.shape[0], self.n_head, size, d_head), self.c_attn.dtype)
        return {"k": kv, "v": kv, "length": jnp.zeros((), jnp.int32), "start": start.astype(jnp.int32)}

    @staticmethod
    def _attend_cache(q, k, v, cache):
        """Writes k, v [B, T, H, D] at slots length .. length + T - 1; each query reads the row's slots from
        `start` to its own. A padding token (before `start`) reads itself only, which keeps it finite. The
        formula is jax.nn.dot_product_attention's (float32 scores and softmax, probabilities in v's dtype)."""
        length, T = cache["length"], q.shape[1]
        write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, jnp.swapaxes(x, 1, 2).astype(c.dtype), length, 2)
        keys, values = write(cache["k"], k), write(cache["v"], v)
        slots = jnp.arange(keys.shape[2])
        query_slots = length + jnp.arange(T)
        causal = slots[None, :] <= query_slots[:, None]  # [T, S]
        own = slots[None, :] == query_slots[:, None]
        mask = (causal[None] & (slots >= cache["start"][:, None])[:, None]) | own[None]  # [B, T, S]
        scores = jnp.einsum("bthd,bhsd->bhts", q, keys, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        o = jnp.einsum("bhts,bhsd->bthd", probs, values)
        return o, {"k": keys, "v": values, "length": length + T, "start": cache["start"]}
