"""Gated linear attention layer, parameter for parameter FLA's `GatedLinearAttention`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlin import ops
from jaxlin.layers.common import (Decoding, GatedRMSNorm, QKVConv, activation, decode_in_kernel, decode_step_of,
                                  decodes_in_kernel, linear, merge_heads, output_gate, project_qkv, split_heads)
from jaxlin.ops import gates


class GatedLinearAttention(nnx.Module):
    """q/k/v/g projections, low-rank forget gate logsigmoid(W2 W1 x + b) / 16, optional short conv
    with SiLU on q/k/v, the GLA recurrence, per-head RMSNorm gated by swish(g), output projection."""

    JOINED_EXTRAS = ("gk_down",)  # computed in one product with q, k and v (project_qkv)

    def __init__(self, d_model: int, n_head: int, *, expand_k: float = 0.5, expand_v: float = 1.0,
                 conv_size: int = 4, gate_low_rank: int = 16, gate_logit_normalizer: float = 16.0,
                 norm_eps: float = 1e-5, out_std: float, impl: str = "auto", elementwise_impl: str = "auto",
                 dtype=jnp.bfloat16, rngs: nnx.Rngs):
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if key_dim % n_head or value_dim % n_head:
            raise ValueError(
                f"GLA: key dim {key_dim} (d_model*expand_k) and value dim {value_dim} (d_model*expand_v) "
                f"must be divisible by n_head={n_head}"
            )
        self.n_head, self.impl, self.dtype = n_head, impl, dtype
        self.gate_logit_normalizer = gate_logit_normalizer
        self.q_proj = linear(d_model, key_dim, dtype=dtype, rngs=rngs)
        self.k_proj = linear(d_model, key_dim, dtype=dtype, rngs=rngs)
        self.v_proj = linear(d_model, value_dim, dtype=dtype, rngs=rngs)
        self.g_proj = linear(d_model, value_dim, dtype=dtype, rngs=rngs)
        # The forget gate's low-rank pair (FLA's gk_proj.0 and gk_proj.1; the export maps the names).
        self.gk_down = linear(d_model, gate_low_rank, dtype=dtype, rngs=rngs)
        self.gk_up = linear(gate_low_rank, key_dim, dtype=dtype, rngs=rngs, bias=True)
        self.conv = QKVConv(key_dim, value_dim, conv_size, impl=elementwise_impl, rngs=rngs) if conv_size else None
        self.g_norm = GatedRMSNorm(value_dim // n_head, eps=norm_eps, impl=elementwise_impl)
        self.o_proj = linear(value_dim, d_model, dtype=dtype, rngs=rngs, std=out_std)

    def decoding(self) -> Decoding:
        """What the decoding kernels take of this layer (``kernels.decode_step``): the step's description, its
        norm, the forget gate's up projection."""
        step = decode_step_of(self, "gla", self.g_norm, gated_norm=True, gate_normalizer=self.gate_logit_normalizer,
                              gate_rank=self.gk_down.out_features)
        up = self.gk_up
        return Decoding(step, self.g_norm, (up.kernel[...].astype(up.dtype), up.bias[...]))

    def __call__(self, x, *, segment_ids=None, state=None, return_state=False):
        state = state or {}
        decoding = self.decoding()
        if decodes_in_kernel(self, decoding.step, x, segment_ids=segment_ids, state=state, return_state=return_state):
            return decode_in_kernel(self, decoding, x, state)
        (q, k, v), extras, conv_cache = project_qkv(self, x, segment_ids=segment_ids, state=state,
                                                    return_state=return_state)
        gk, g = extras["gk_down"], output_gate(self, x, extras)
        up = self.gk_up
        # In the compute dtype, as FLA's layer under autocast gives its kernel: the kernels sum the gates in
        # float32, and the Mosaic GPU kernels read bf16 gates only. Stored for the backward (the kernels'
        # residual), not recomputed.
        gk = activation(gates.log_sigmoid_gate(jnp.dot(gk.astype(up.dtype), up.kernel[...].astype(up.dtype)),
                                               up.bias[...], self.gate_logit_normalizer))
        o, recurrent = ops.gla(
            q, k, v, split_heads(gk, self.n_head), initial_state=state.get("recurrent"),
            output_final_state=return_state, segment_ids=segment_ids, impl=self.impl,
        )
        o = self.g_norm(o, split_heads(g, self.n_head))
        y = self.o_proj(merge_heads(o))
        return y, ({"recurrent": recurrent, "conv": conv_cache} if return_state else None)
