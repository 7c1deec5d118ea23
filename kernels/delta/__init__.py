"""Chunked delta rule and gated delta rule on Pallas, differentiable via custom_vjp.

``delta_pallas`` is the entry point of ``jaxlin.ops.delta_rule`` (``g`` None) and
``gated_delta_rule`` with ``impl="pallas"``; inputs arrive validated, and ``jaxlin.ops.dispatch`` picks
the backend. Two backends:

- Mosaic GPU (the Hopper path: TMA, wgmma), bf16 q, k, v with K and V in {64, 128}: forward, the
  chunk transform then one fused pass for the states, written values and outputs
  (``mosaic_forward.py``); backward, the reverse state-gradient pass then the two chunk-gradient
  kernels (``mosaic_backward.py``);
- Triton (any supported dtype, float32 included): three kernels forward (``forward.py``), three
  backward (``backward.py``).

Both save the same residuals (``w``, the inverses ``x``, the chunk states and written values), the
Mosaic forward with ``w`` negated (see ``mosaic_forward.py``).
"""

import functools

import jax
import jax.numpy as jnp

from ..common import (CHUNK, chunk_relative_segments, dot_dtype_for, pad_time, saved_for_backward,
                      segment_index, state_block_v)
from . import mosaic_forward
from .backward import chunk_grads, state_grad_pass
from .forward import chunk_outputs, chunk_transform, state_pass
from .mosaic_backward import gate_grads, output_path_grads, state_grad_pass_mosaic, wy_path_grads
from .mosaic_forward import chunk_transform_mosaic, state_outputs_mosaic

HEAD_DIMS = (32, 64, 128)
BACKENDS = ("mosaic", "triton")


def supports(q, k, v, *gates_and_beta, **_):
    """True for K, V in {32, 64, 128} and bf16/float32 inputs (tested compiled on an H100: tests/kernels)."""
    float_ok = all(x.dtype in (jnp.bfloat16, jnp.float32) for x in (q, k, v, *gates_and_beta))
    return q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS and float_ok


def mosaic_supports(q, k, v):
    """The Mosaic kernels: bf16 q, k, v (wgmma operands; gates and beta may be float32) and K, V in
    {64, 128}."""
    bf16 = all(x.dtype == jnp.bfloat16 for x in (q, k, v))
    return bf16 and q.shape[-1] in mosaic_forward.HEAD_DIMS and v.shape[-1] in mosaic_forward.HEAD_DIMS


def delta_pallas(q, k, v, g, beta, *, scale, initial_state, output_final_state, segment_ids,
                 backend, interpret=False):
    """``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 or None)``; ``g`` None: the plain rule.
    ``backend`` "mosaic" (where ``mosaic_supports``) or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "mosaic" and not mosaic_supports(q, k, v):
        raise ValueError(f"backend='mosaic' needs bf16 q, k, v and K, V in {mosaic_forward.HEAD_DIMS}; got "
                         f"{q.dtype}, K={q.shape[-1]}, V={v.shape[-1]}. Use 'triton'.")
    use_mosaic = backend == "mosaic"
    B, T = q.shape[:2]
    padded = -(-T // CHUNK) * CHUNK
    seg = segment_index(segment_ids, B, T, padded)
    o, final_state = _delta(q, k, v, beta, g, initial_state, seg, float(scale), bool(interpret), use_mosaic)
    return o, (final_state if output_final_state else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _delta(q, k, v, beta, g, initial_state, seg, scale, interpret, use_mosaic):
    return _forward(q, k, v, beta, g, initial_state, seg, scale, interpret, use_mosaic)[0]


def _padded(T, *arrays):
    length = -(-T // CHUNK) * CHUNK
    return [None if x is None else pad_time(x, length) for x in arrays]


def heads_padded(x):
    """``[B, T, H]`` -> float32 ``[B, T, Hp]``, ``Hp`` the next multiple of 4: the Mosaic kernels load
    a chunk's rows of every head by TMA, which moves rows of 16-byte multiples."""
    H = x.shape[-1]
    return jnp.pad(x.astype(jnp.float32), [(0, 0), (0, 0), (0, -H % 4)])


def chunk_cumsum(g):
    """``[B, T, H]`` log gates -> their cumsum from each chunk's start, float32; T a multiple of CHUNK."""
    B, T, H = g.shape
    return jnp.cumsum(g.astype(jnp.float32).reshape(B, T // CHUNK, CHUNK, H), axis=2).reshape(B, T, H)


def _forward(q, k, v, beta, g, initial_state, seg, scale, interpret, use_mosaic):
    B, T, H, _ = q.shape
    V = v.shape[-1]
    qp, kp, vp, betap, gp = _padded(T, q, k, v, beta, g)
    if use_mosaic:
        rel = None if seg is None else chunk_relative_segments(seg)
        b = None if gp is None else heads_padded(chunk_cumsum(gp))
        h0 = None if initial_state is None else initial_state.astype(jnp.float32)
        neg_w, u, x = chunk_transform_mosaic(kp, vp, heads_padded(betap), b, rel, interpret=interpret)
        o, hs, v_new, final = state_outputs_mosaic(qp, kp, neg_w, u, b, rel, h0, scale=scale,
                                                   interpret=interpret)
        return (o[:, :T], final), (neg_w, x, hs, v_new)  # the Mosaic backward reads -W
    dot_dtype = dot_dtype_for(q, k, v)
    w, u, x = chunk_transform(kp, vp, betap, gp, seg, dot_dtype=dot_dtype, interpret=interpret)
    hs, v_new, final = state_pass(kp, gp, seg, w, u, initial_state, dot_dtype=dot_dtype,
                                  block_v=state_block_v(B, H, V), interpret=interpret)
    o = chunk_outputs(qp, kp, gp, seg, hs, v_new, scale=scale, out_dtype=v.dtype,
                      dot_dtype=dot_dtype, interpret=interpret)[:, :T]
    return (o, final), (w, x, hs, v_new)


def _delta_fwd(q, k, v, beta, g, initial_state, seg, scale, interpret, use_mosaic):
    out, saved = _forward(q, k, v, beta, g, initial_state, seg, scale, interpret, use_mosaic)
    return out, (q, k, v, beta, g, initial_state, seg) + saved_for_backward(*saved)


def _delta_bwd(scale, interpret, use_mosaic, residuals, cotangents):
    q, k, v, beta, g, initial_state, seg, w, x, hs, v_new = residuals
    do, dfinal = cotangents
    B, T, H, _ = q.shape
    V = v.shape[-1]
    qp, kp, vp, betap, gp, dop = _padded(T, q, k, v, beta, g, do)
    if use_mosaic:
        grads, dh0 = _mosaic_backward(qp, kp, vp, betap, gp, seg, w, x, hs, v_new, dop, dfinal,  # w: -W
                                      scale=scale, interpret=interpret)
    else:
        dot_dtype = dot_dtype_for(q, k, v)
        dhs, dv_new, dh0 = state_grad_pass(qp, kp, gp, seg, w, dop, dfinal, scale=scale,
                                           dot_dtype=dot_dtype, block_v=state_block_v(B, H, V),
                                           interpret=interpret)
        grads = chunk_grads(qp, kp, vp, betap, gp, seg, x, hs, dhs, v_new, dv_new, dop, scale=scale,
                            dot_dtype=dot_dtype, interpret=interpret)
    dq, dk, dv, dbeta, dg = (None if d is None else d[:, :T] for d in grads)
    return dq, dk, dv, dbeta, dg, (dh0 if initial_state is not None else None), None


def _mosaic_backward(q, k, v, beta, g, seg, neg_w, x, hs, v_new, do, dfinal, *, scale, interpret):
    """The backward on Mosaic GPU (``mosaic_backward.py``): ``((dq, dk, dv, dbeta, dg), dh0)``."""
    rel = None if seg is None else chunk_relative_segments(seg)
    H = q.shape[2]
    b = None if g is None else heads_padded(chunk_cumsum(g))
    dhs, dv_new, dh0 = state_grad_pass_mosaic(q, k, neg_w, do, b, rel, dfinal.astype(jnp.float32), scale=scale,
                                              interpret=interpret)
    dq, dk_output, db_output, d_to_end = output_path_grads(q, k, v_new, do, b, rel, hs, dhs, scale=scale,
                                                           interpret=interpret)
    dv, dbeta, dk, db_wy = wy_path_grads(k, v, heads_padded(beta), b, rel, x, hs, dv_new, dk_output,
                                         interpret=interpret)
    dg = None if g is None else gate_grads(db_output + db_wy, d_to_end)[..., :H].astype(g.dtype)
    return (dq, dk, dv, dbeta[..., :H].astype(beta.dtype), dg), dh0


_delta.defvjp(_delta_fwd, _delta_bwd)
