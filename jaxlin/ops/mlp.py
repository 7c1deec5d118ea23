"""The MLP's two products with GELU between them, fused into the products' epilogues on the GPU.

``gelu_mlp`` runs ``kernels.gelu_matmul`` (Mosaic GPU; interpret mode off the GPU);
``dispatch.fused_mlp_applies`` says where the model's MLP takes it. ``decode_mlp`` runs a one-row decoding
step's LayerNorm and MLP in ``kernels.decode_mlp`` (Triton), where ``dispatch.decode_mlp_applies``. The XLA formula
lives in the MLP itself.
"""

import jax
import jax.numpy as jnp

from kernels import decode_mlp as decode_mlp_kernel
from kernels import gelu_matmul
from kernels.gelu_matmul import RESIDUAL_NAME  # the fused forward's h and gelu(h), which the backward reads

from .dispatch import require_one_device

__all__ = ["gelu_mlp", "decode_mlp", "RESIDUAL_NAME"]


def gelu_mlp(x, w_fc, w_proj):
    """``gelu(x @ w_fc) @ w_proj`` (GELU's tanh form): x ``[..., d]``, w_fc ``[d, 4 d]``, w_proj ``[4 d, d]``,
    all bf16."""
    require_one_device("the fused GELU MLP", "model.mlp_impl='auto' or 'xla'")
    if not (x.dtype == w_fc.dtype == w_proj.dtype == jnp.bfloat16):
        raise ValueError(f"the fused GELU MLP needs bf16 operands, got x {x.dtype}, w_fc {w_fc.dtype}, "
                         f"w_proj {w_proj.dtype}; use model.mlp_impl='xla' for float32")
    return gelu_matmul.gelu_mlp(x, w_fc, w_proj, jax.default_backend() != "gpu")


def decode_mlp(x, ln_scale, ln_bias, w_fc_t, w_proj, *, eps: float):
    """``gelu(layer_norm(x) @ w_fc_t.T) @ w_proj`` for a decoding step's one row x ``[1, d]``, float32, in one
    kernel (``kernels.decode_mlp``; interpret mode off the GPU); w_fc_t: c_fc's kernel transposed."""
    partials = decode_mlp_kernel.decode_mlp(x, ln_scale, ln_bias, w_fc_t, w_proj, eps=eps,
                                            interpret=jax.default_backend() != "gpu")
    return partials.sum(0)
