"""Linear-attention ops: GLA, DeltaNet and Gated DeltaNet.

Each op validates its arguments (``checks.py``), applies the optional q/k L2 normalisation, and runs the
implementation that ``impl`` names: ``"reference"``, ``"chunked"``, ``"pallas"``, ``"pallas:mosaic"``,
``"pallas:triton"`` or ``"auto"`` (``dispatch.py`` holds the table and the rules).

Under a mesh with a ``sequence`` axis of several devices GLA runs context-parallel
(``context_parallel.py``): each device runs the chosen implementation on its slice of every sequence and the
devices exchange only per-head states.

All return ``(o, final_state)``: ``o`` in v's dtype ``[B, T, H, V]``, ``final_state``
float32 ``[B, H, K, V]`` when ``output_final_state`` else None.
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import kernels.decode_step
from kernels.common import RESIDUAL_NAME

from . import context_parallel, dispatch
from .checks import check_inputs

__all__ = ["gla", "delta_rule", "gated_delta_rule", "decode_step", "DecodeStep", "l2norm", "SAVEABLE_NAMES"]

# `jax.checkpoint` names: every op's output, and the Pallas kernels' backward residuals (chunk states).
OUTPUT_NAME = "linear_attention_output"
SAVEABLE_NAMES = (OUTPUT_NAME, RESIDUAL_NAME)
DecodeStep = kernels.decode_step.Step  # the static description of a layer's decoding step


def l2norm(x, eps=1e-6):
    """``x / sqrt(sum(x^2) + eps)`` over the last axis, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _dispatch(op, impl, args, kwargs):
    o, final_state = dispatch.linear_attention(op, impl, args, kwargs)
    return checkpoint_name(o, OUTPUT_NAME), final_state


def _kwargs(q, scale, initial_state, output_final_state, segment_ids):
    return dict(scale=q.shape[-1] ** -0.5 if scale is None else scale, initial_state=initial_state,
                output_final_state=output_final_state, segment_ids=segment_ids)


def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
        impl="auto", validate=False):
    """Gated linear attention: ``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    q, k, g ``[B, T, H, K]`` (g the log forget gate, <= 0), v ``[B, T, H, V]``.
    """
    check_inputs(q, k, v, g=g, g_rank=4, initial_state=initial_state, segment_ids=segment_ids,
                 impl=impl, validate=validate)
    kwargs = _kwargs(q, scale, initial_state, output_final_state, segment_ids)
    if context_parallel.split():  # sequences split over devices: each runs this op on its slice
        def local(q, k, v, g, segment_ids):
            return _dispatch("gla", impl, (q, k, v, g), _kwargs(q, kwargs["scale"], None, True, segment_ids))

        o, final_state = context_parallel.gla(local, q, k, v, g, **kwargs)
        return checkpoint_name(o, OUTPUT_NAME), final_state
    return _dispatch("gla", impl, (q, k, v, g), kwargs)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               segment_ids=None, use_qk_l2norm=False, impl="auto", validate=False):
    """DeltaNet: ``u_t = beta_t (v_t - S_{t-1}^T k_t)``, ``S_t = S_{t-1} + k_t u_t^T``, ``o_t = scale S_t^T q_t``.

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]``.
    """
    check_inputs(q, k, v, beta=beta, initial_state=initial_state, segment_ids=segment_ids,
                 impl=impl, validate=validate)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    kwargs = _kwargs(q, scale, initial_state, output_final_state, segment_ids)
    return _dispatch("delta_rule", impl, (q, k, v, beta), kwargs)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     segment_ids=None, use_qk_l2norm=False, impl="auto", validate=False):
    """Gated DeltaNet: the delta rule applied to ``S' = exp(g_t) S_{t-1}``.

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g (log gate, <= 0) and beta ``[B, T, H]``.
    """
    check_inputs(q, k, v, g=g, g_rank=3, beta=beta, initial_state=initial_state,
                 segment_ids=segment_ids, impl=impl, validate=validate)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    kwargs = _kwargs(q, scale, initial_state, output_final_state, segment_ids)
    return _dispatch("gated_delta_rule", impl, (q, k, v, g, beta), kwargs)


def decode_step(step, y, gate, caches, weights, state, norm_weight, params=()):
    """A recurrent layer's decoding step in one kernel (``kernels.decode_step``, whose docstring gives the
    arguments; interpret mode off the GPU): ``(o [B, H*V], state, conv caches)``. The layers call it where
    ``dispatch.decode_kernel_applies``."""
    return kernels.decode_step.decode_step(step, y, gate, caches, weights, state, norm_weight, params,
                                           interpret=jax.default_backend() != "gpu")
