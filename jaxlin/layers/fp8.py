"""FP8 projections (``model.matmul_precision="fp8"``) on Flax's ``fp8_ops``.

Each projection that runs in FP8 carries an ``Fp8Dot`` as its ``nnx.Linear``'s ``dot_general``: per-tensor
delayed scaling, e4m3 for the input and the kernel, e5m2 for the output's gradient, each scale computed from
a history of the tensor's absolute maxima. The scales and histories are ``Fp8Meta`` variables. Flax's ops
hand their next values back as their "gradients" (the backward pass is where the gradient's amax is seen),
so the train step overwrites them with those gradients rather than stepping them with the optimizer
(``split_fp8_meta`` keeps them apart).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from flax.linen import fp8_ops

MATMUL_PRECISIONS = ("bf16", "fp8")
# The nnx.Linear attributes of the attention layers and the MLP that run in FP8: q/k/v (and the small gate
# projections that share their joined product, see jaxlin.layers.common.joined_product), the output gate,
# the output projection, the MLP's two products. The gates' own products, the embedding/head, the norms and
# the recurrence stay in the compute dtype.
FP8_PROJECTIONS = ("q_proj", "g_proj", "o_proj", "c_attn", "c_proj", "c_fc")


class Fp8Meta(nnx.Param):
    """A scale or amax history of an FP8 product: overwritten each step by its gradient (its next value),
    never stepped by the optimizer, not a weight (no export, no parameter count)."""


class Fp8Dot(nnx.Module):
    """``dot_general`` of a projection in FP8, with the scaling state it needs (Flax's layout:
    a ``(1,)`` scale and an ``(amax_history,)`` history each for input, kernel and output gradient)."""

    def __init__(self, amax_history: int):
        for name in ("input", "kernel", "output_grad"):
            setattr(self, f"{name}_scale", Fp8Meta(jnp.ones((1,), jnp.float32)))
            setattr(self, f"{name}_amax_history", Fp8Meta(jnp.zeros((amax_history,), jnp.float32)))

    def __call__(self, x, kernel, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
        del precision, preferred_element_type, out_sharding  # Flax's op fixes these; the output is x's dtype
        return fp8_ops.fp8_scaled_dot_general(
            x, kernel, dimension_numbers, preferred_element_type=x.dtype, quantize_compute_type=kernel.dtype,
            lhs_scale=self.input_scale[...], rhs_scale=self.kernel_scale[...],
            grad_scale=self.output_grad_scale[...], lhs_amax_history=self.input_amax_history[...],
            rhs_amax_history=self.kernel_amax_history[...],
            grad_amax_history=self.output_grad_amax_history[...])


def use_fp8(module: nnx.Module, amax_history: int) -> None:
    """Runs `module`'s FP8_PROJECTIONS (those it has) in FP8."""
    for name in FP8_PROJECTIONS:
        layer = getattr(module, name, None)
        if isinstance(layer, nnx.Linear):
            layer.dot_general = nnx.data(Fp8Dot(amax_history))


def runs_in_fp8(layer: nnx.Linear) -> bool:
    return isinstance(layer.dot_general, Fp8Dot)


def matmul(x, kernel, layer: nnx.Linear):
    """``x @ kernel`` (kernel ``[d_in, d_out]``, e.g. `layer`'s own or joined with others) through `layer`'s
    FP8 product when it has one."""
    if runs_in_fp8(layer):
        return layer.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return jnp.dot(x, kernel)


def split_fp8_meta(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(weights, FP8 scaling state) of a model's Params."""
    return nnx.split_state(params, nnx.Not(Fp8Meta), Fp8Meta)
