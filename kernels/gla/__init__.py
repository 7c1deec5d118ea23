"""Chunked gated linear attention on Pallas, differentiable via custom_vjp.

``gla_pallas`` is the entry point ``jaxlin.ops.gla(..., impl="pallas")`` calls; inputs arrive
validated, and ``jaxlin.ops.dispatch`` picks the backend. Two backends:

- Mosaic GPU (the Hopper path: TMA, wgmma), bf16 only: one fused forward kernel
  (``mosaic_forward.py``) and one fused backward kernel (``mosaic_backward.py``), each a pass over
  the chunks with the state, or its gradient, in registers. The backward has only the whole-chunk
  form, so a call in which some chunk decays by more than ``common.MAX_WHOLE_CHUNK_DECAY`` (gates
  averaging below about -0.6 per token over 64 tokens) takes the Triton backward instead, as does
  K = 64 (``mosaic_backward.supports``: slower there than the Triton backward).
- Triton (any supported dtype, float32 included): a sequential state pass then one program per
  chunk, forward (``forward.py``) and backward (``backward.py``).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ..common import (CHUNK, chunk_relative_segments, dot_dtype_for, pad_time, saved_for_backward,
                      segment_index, state_block_v)
from . import mosaic_backward
from .backward import chunk_grads, state_grad_pass
from .forward import chunk_outputs, state_pass
from .mosaic_backward import all_chunks_mild, final_state_gate_grad, gla_backward_mosaic
from .mosaic_forward import gla_forward_mosaic

HEAD_DIMS = (32, 64, 128)
BACKENDS = ("mosaic", "triton")


def mosaic_supports(q, k, v, g):
    """The Mosaic kernels: bf16 (wgmma operands), V a multiple of 64 (the state ``[V, K]`` is a wgmma
    accumulator) and K <= 64 (the forward's SMEM tiles fit at V = 128)."""
    bf16 = all(x.dtype == jnp.bfloat16 for x in (q, k, v, g))
    return bf16 and v.shape[-1] in (64, 128) and q.shape[-1] in (32, 64)


def supports(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
             segment_ids=None):
    """True for the calls these kernels handle: K, V in {32, 64, 128}, bf16 or float32."""
    float_ok = all(x.dtype in (jnp.bfloat16, jnp.float32) for x in (q, k, v, g))
    return q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS and float_ok


def gla_pallas(q, k, v, g, *, scale, initial_state, output_final_state, segment_ids,
               backend, interpret=False):
    """``(o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 or None)``; ``backend`` "mosaic" (where
    ``mosaic_supports``) or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "mosaic" and not mosaic_supports(q, k, v, g):
        raise ValueError(f"backend='mosaic' needs bf16 q, k, v, g, V in (64, 128) and K in (32, 64); got "
                         f"{q.dtype}/{g.dtype}, K={q.shape[-1]}, V={v.shape[-1]}. Use 'triton'.")
    use_mosaic = backend == "mosaic"
    B, T = q.shape[:2]
    padded = -(-T // CHUNK) * CHUNK
    seg = segment_index(segment_ids, B, T, padded)
    o, final_state = _gla(q, k, v, g, initial_state, seg, float(scale), bool(interpret), use_mosaic)
    return o, (final_state if output_final_state else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _gla(q, k, v, g, initial_state, seg, scale, interpret, use_mosaic):
    return _forward(q, k, v, g, initial_state, seg, scale, interpret, use_mosaic)[0]


def _forward(q, k, v, g, initial_state, seg, scale, interpret, use_mosaic):
    B, T, H, _ = q.shape
    V = v.shape[-1]
    padded = -(-T // CHUNK) * CHUNK
    qp, kp, vp, gp = (pad_time(x, padded) for x in (q, k, v, g))
    h0_t = None if initial_state is None else jnp.swapaxes(initial_state, -1, -2)
    if use_mosaic:
        rel = None if seg is None else chunk_relative_segments(seg)
        h0_t = None if h0_t is None else h0_t.astype(jnp.float32)
        o, hs, final_t = gla_forward_mosaic(qp, kp, vp, gp, rel, h0_t, scale=scale, interpret=interpret)
    else:
        dot_dtype = dot_dtype_for(q, k, v)
        hs, final_t = state_pass(kp, vp, gp, seg, h0_t, dot_dtype=dot_dtype,
                                 block_v=state_block_v(B, H, V), interpret=interpret)
        o = chunk_outputs(qp, kp, vp, gp, seg, hs, scale=scale, dot_dtype=dot_dtype, interpret=interpret)
    return (o[:, :T], jnp.swapaxes(final_t, -1, -2)), hs


def _gla_fwd(q, k, v, g, initial_state, seg, scale, interpret, use_mosaic):
    out, hs = _forward(q, k, v, g, initial_state, seg, scale, interpret, use_mosaic)
    return out, (q, k, v, g, initial_state, seg, *saved_for_backward(hs))


def _triton_backward(qp, kp, vp, gp, dop, seg, hs, dht, *, scale, interpret):
    B, _, H, _ = qp.shape
    V = vp.shape[-1]
    dot_dtype = dot_dtype_for(qp, kp, vp)
    dhs, dh0_t = state_grad_pass(qp, dop, gp, seg, dht, scale=scale, dot_dtype=dot_dtype,
                                 block_v=state_block_v(B, H, V), interpret=interpret)
    grads = chunk_grads(qp, kp, vp, gp, dop, seg, hs, dhs, scale=scale, dot_dtype=dot_dtype, interpret=interpret)
    return (*grads, dh0_t)


def _gla_bwd(scale, interpret, use_mosaic, residuals, cotangents):
    q, k, v, g, initial_state, seg, hs = residuals
    do, dfinal = cotangents
    T, K, V = q.shape[1], q.shape[-1], v.shape[-1]
    padded = seg.shape[1] if seg is not None else -(-T // CHUNK) * CHUNK
    qp, kp, vp, gp, dop = (pad_time(x, padded) for x in (q, k, v, g, do.astype(v.dtype)))
    dht = jnp.swapaxes(dfinal, -1, -2).astype(jnp.float32)
    inputs = (qp, kp, vp, gp, dop, hs, dht)

    def triton(q, k, v, g, do, hs, dht):
        return _triton_backward(q, k, v, g, do, seg, hs, dht, scale=scale, interpret=interpret)

    if use_mosaic and mosaic_backward.supports(K, V):
        rel = None if seg is None else chunk_relative_segments(seg)

        def mosaic(q, k, v, g, do, hs, dht):
            later = final_state_gate_grad(k, v, g, rel, hs[:, :, -1], dht)
            return gla_backward_mosaic(q, k, v, g, do, rel, hs, dht, later, scale=scale, interpret=interpret)

        grads = lax.cond(all_chunks_mild(gp), mosaic, triton, *inputs)
    else:
        grads = triton(*inputs)
    dq, dk, dv, dg = (x[:, :T] for x in grads[:4])
    dh0 = jnp.swapaxes(grads[4], -1, -2) if initial_state is not None else None
    return dq, dk, dv, dg, dh0, None


_gla.defvjp(_gla_fwd, _gla_bwd)
