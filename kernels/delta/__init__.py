"""Chunked delta rule and gated delta rule on Pallas (Triton lowering), differentiable via custom_vjp.

``kernels.delta_rule`` and ``kernels.gated_delta_rule`` are the thin entry points
``jaxlin.ops`` dispatches to; both run the kernels here, the plain rule without gates.
Forward: three kernels (``forward.py``); backward: three (``backward.py``).
"""

import functools

import jax
import jax.numpy as jnp

from ..common import CHUNK, dot_dtype_for, pad_time, saved_for_backward, segment_index, state_block_v
from .backward import chunk_grads, state_grad_pass
from .forward import chunk_outputs, chunk_transform, state_pass

HEAD_DIMS = (32, 64, 128)


def supports(q, k, v, *gates_and_beta, **_):
    """True for K, V in {32, 64, 128} and bf16/float32 inputs (tested compiled on an H100: tests/kernels)."""
    float_ok = all(x.dtype in (jnp.bfloat16, jnp.float32) for x in (q, k, v, *gates_and_beta))
    return q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS and float_ok


def delta_pallas(q, k, v, g, beta, *, scale, initial_state, output_final_state, segment_ids,
                 interpret=False):
    """``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 or None)``; ``g`` None: plain rule."""
    B, T = q.shape[:2]
    padded = -(-T // CHUNK) * CHUNK
    seg = segment_index(segment_ids, B, T, padded)
    o, final_state = _delta(q, k, v, beta, g, initial_state, seg, float(scale), bool(interpret))
    return o, (final_state if output_final_state else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _delta(q, k, v, beta, g, initial_state, seg, scale, interpret):
    return _forward(q, k, v, beta, g, initial_state, seg, scale, interpret)[0]


def _padded(T, *arrays):
    length = -(-T // CHUNK) * CHUNK
    return [None if x is None else pad_time(x, length) for x in arrays]


def _forward(q, k, v, beta, g, initial_state, seg, scale, interpret):
    B, T, H, _ = q.shape
    V = v.shape[-1]
    qp, kp, vp, betap, gp = _padded(T, q, k, v, beta, g)
    dot_dtype = dot_dtype_for(q, k, v)
    w, u, x = chunk_transform(kp, vp, betap, gp, seg, dot_dtype=dot_dtype, interpret=interpret)
    hs, v_new, final = state_pass(kp, gp, seg, w, u, initial_state, dot_dtype=dot_dtype,
                                  block_v=state_block_v(B, H, V), interpret=interpret)
    o = chunk_outputs(qp, kp, gp, seg, hs, v_new, scale=scale, out_dtype=v.dtype,
                      dot_dtype=dot_dtype, interpret=interpret)[:, :T]
    return (o, final), (w, x, hs, v_new)


def _delta_fwd(q, k, v, beta, g, initial_state, seg, scale, interpret):
    out, saved = _forward(q, k, v, beta, g, initial_state, seg, scale, interpret)
    return out, (q, k, v, beta, g, initial_state, seg) + saved_for_backward(*saved)


def _delta_bwd(scale, interpret, residuals, cotangents):
    q, k, v, beta, g, initial_state, seg, w, x, hs, v_new = residuals
    do, dfinal = cotangents
    B, T, H, _ = q.shape
    V = v.shape[-1]
    qp, kp, vp, betap, gp, dop = _padded(T, q, k, v, beta, g, do)
    dot_dtype = dot_dtype_for(q, k, v)
    dhs, dv_new, dh0 = state_grad_pass(qp, kp, gp, seg, w, dop, dfinal, scale=scale,
                                       dot_dtype=dot_dtype, block_v=state_block_v(B, H, V),
                                       interpret=interpret)
    grads = chunk_grads(qp, kp, vp, betap, gp, seg, x, hs, dhs, v_new, dv_new, dop, scale=scale,
                        dot_dtype=dot_dtype, interpret=interpret)
    dq, dk, dv, dbeta, dg = (None if d is None else d[:, :T] for d in grads)
    return dq, dk, dv, dbeta, dg, (dh0 if initial_state is not None else None), None


_delta.defvjp(_delta_fwd, _delta_bwd)
