"""The MLP's two products with GELU between them, fused into the products' epilogues on the GPU.

``gelu_mlp`` runs ``kernels.gelu_matmul`` (Mosaic GPU; interpret mode off the GPU); ``fused_applies``
says whether ``impl="auto"`` of the model's MLP takes it. The XLA formula lives in the MLP itself.
"""

import jax
import jax.numpy as jnp

from .checks import on_one_gpu, require_one_device

# kernels.gelu_matmul.RESIDUAL_NAME (not imported here, so that jaxlin runs without the kernels package):
# the fused forward's h and gelu(h), which the backward reads.
RESIDUAL_NAME = "gelu_matmul_residual"


def fused_applies(x, w_fc) -> bool:
    """On one GPU (the kernels are not partitioned over a mesh), with bf16 operands the tiles divide."""
    if not on_one_gpu():
        return False
    from kernels import gelu_matmul
    return gelu_matmul.supports(x, w_fc)


def gelu_mlp(x, w_fc, w_proj):
    """``gelu(x @ w_fc) @ w_proj`` (GELU's tanh form): x ``[..., d]``, w_fc ``[d, 4 d]``, w_proj ``[4 d, d]``,
    all bf16."""
    from kernels import gelu_matmul
    require_one_device("the fused GELU MLP", "model.mlp_impl='auto' or 'xla'")
    if not (x.dtype == w_fc.dtype == w_proj.dtype == jnp.bfloat16):
        raise ValueError(f"the fused GELU MLP needs bf16 operands, got x {x.dtype}, w_fc {w_fc.dtype}, "
                         f"w_proj {w_proj.dtype}; use model.mlp_impl='xla' for float32")
    return gelu_matmul.gelu_mlp(x, w_fc, w_proj, jax.default_backend() != "gpu")
