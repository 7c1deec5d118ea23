"""DeltaNet and Gated DeltaNet layers, parameter for parameter FLA's `DeltaNet` and `GatedDeltaNet`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import ops
from jaxlin.layers.common import (Decoding, GatedRMSNorm, QKVConv, decode_in_kernel, decode_step_of,
                                  decodes_in_kernel, linear, merge_heads, output_gate, project_qkv, split_heads)


class DeltaNet(nnx.Module):
    """Delta-rule attention: q/k/v projections, short conv with SiLU, beta = sigmoid(b_proj x),
    L2-normalised q/k (inside the op), per-head RMSNorm, optional swish output gate."""

    gated = False
    JOINED_EXTRAS = ("b_proj", "a_proj")  # computed in one product with q, k and v (project_qkv); a_proj: gated only

    def __init__(self, d_model: int, n_head: int, *, expand_k: float = 1.0, expand_v: float = 1.0,
                 conv_size: int = 4, use_gate: bool = False, norm_eps: float = 1e-5, out_std: float,
                 impl: str = "auto", elementwise_impl: str = "auto", dtype=jnp.bfloat16, rngs: nnx.Rngs):
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if key_dim % n_head or value_dim % n_head:
            raise ValueError(
                f"{type(self).__name__}: key dim {key_dim} and value dim {value_dim} must be divisible "
                f"by n_head={n_head}"
            )
        self.n_head, self.impl = n_head, impl
        self.q_proj = linear(d_model, key_dim, dtype=dtype, rngs=rngs)
        self.k_proj = linear(d_model, key_dim, dtype=dtype, rngs=rngs)
        self.v_proj = linear(d_model, value_dim, dtype=dtype, rngs=rngs)
        self.b_proj = linear(d_model, n_head, dtype=dtype, rngs=rngs)
        self.a_proj = linear(d_model, n_head, dtype=dtype, rngs=rngs) if self.gated else None
        if self.gated:
            # Mamba-2's gate parameters, as FLA initialises them: A in (0, 16], dt log-uniform in [1e-3, 0.1].
            key_a, key_dt = jax.random.split(rngs.params())
            self.A_log = nnx.Param(jnp.log(jax.random.uniform(key_a, (n_head,), jnp.float32, 1e-4, 16.0)))
            dt = jnp.exp(jax.random.uniform(key_dt, (n_head,), jnp.float32, math.log(1e-3), math.log(0.1)))
            dt = jnp.maximum(dt, 1e-4)
            self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))  # inverse softplus
        self.conv = QKVConv(key_dim, value_dim, conv_size, impl=elementwise_impl, rngs=rngs) if conv_size else None
        self.g_proj = linear(d_model, value_dim, dtype=dtype, rngs=rngs) if use_gate else None
        self.o_norm = GatedRMSNorm(value_dim // n_head, eps=norm_eps, impl=elementwise_impl)
        self.o_proj = linear(value_dim, d_model, dtype=dtype, rngs=rngs, std=out_std)

    def decoding(self) -> Decoding:
        """What the decoding kernels take of this layer (``kernels.decode_step``): the step's description, its
        norm, the gated rule's decay parameters."""
        step = decode_step_of(self, "gated_delta" if self.gated else "delta", self.o_norm,
                              gated_norm=self.g_proj is not None)
        return Decoding(step, self.o_norm, (self.A_log[...], self.dt_bias[...]) if self.gated else ())

    def __call__(self, x, *, segment_ids=None, state=None, return_state=False):
        state = state or {}
        decoding = self.decoding()
        if decodes_in_kernel(self, decoding.step, x, segment_ids=segment_ids, state=state, return_state=return_state):
            return decode_in_kernel(self, decoding, x, state)
        (q, k, v), extras, conv_cache = project_qkv(self, x, segment_ids=segment_ids, state=state,
                                                    return_state=return_state)
        b, a, gate = extras["b_proj"], extras.get("a_proj"), output_gate(self, x, extras)
        beta = jax.nn.sigmoid(b.astype(jnp.float32))
        common = dict(initial_state=state.get("recurrent"), output_final_state=return_state,
                      segment_ids=segment_ids, use_qk_l2norm=True, impl=self.impl)
        if self.gated:
            a = a.astype(jnp.float32) + self.dt_bias[...]
            g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a)
            o, recurrent = ops.gated_delta_rule(q, k, v, g, beta, **common)
        else:
            o, recurrent = ops.delta_rule(q, k, v, beta, **common)
        gate = None if gate is None else split_heads(gate, self.n_head)
        y = self.o_proj(merge_heads(self.o_norm(o, gate)))
        return y, ({"recurrent": recurrent, "conv": conv_cache} if return_state else None)


class GatedDeltaNet(DeltaNet):
    """DeltaNet on a decayed state: g = -exp(A_log) * softplus(a_proj x + dt_bias); swish output gate."""

    gated = True

    def __init__(self, d_model: int, n_head: int, *, use_gate: bool = True, **kwargs):
        super().__init__(d_model, n_head, use_gate=use_gate, **kwargs)
