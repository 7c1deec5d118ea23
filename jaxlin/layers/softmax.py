"""nanoGPT's causal self-attention, the softmax baseline."""

from __future__ import annotations

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
        if state is not None or return_state:
            raise ValueError("softmax attention keeps no recurrent state: call the model without state/return_state")
        q, k, v = (split_heads(t, self.n_head) for t in jnp.split(self.c_attn(x), 3, axis=-1))
        o = causal_attention(q, k, v, segment_ids=segment_ids, impl=self.impl)
        return self.c_proj(merge_heads(o)), None
