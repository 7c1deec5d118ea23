"""GLA forward: a sequential state pass over chunks, then all chunks' outputs in parallel.

1. ``state_pass``: one program per (batch, head, V-block) walks the chunks in order and
   records the state entering each chunk, ``hs[c]``, and the final state.
2. ``chunk_outputs``: one program per (batch, head, chunk) forms
   ``o = scale * (m * (q e^b) S + A v)`` from ``hs[c]``, with ``A`` the gated causal
   scores inside the chunk: one product for mildly decaying chunks, else built sub-chunk
   by sub-chunk (see ``kernels.common``).

Segments (optional): ``seg`` is the running segment index (``common.segment_index``).
A token reads the carried state only if it is in the state's segment (``m``), sees only
earlier tokens of its own segment, and only tokens of the chunk's last segment (and the
carried state, if no reset happened in the chunk) reach the next state.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..common import (CHUNK, NUM_SUB, causal_mask, chunk_total_gate, compiler_params,
                      cumulative_gates, decays_mildly, load_f32, matmul, pair_decay, segment_bounds,
                      sequential_state_call, tile_rows)


def _state_pass_kernel(k_ref, v_ref, g_ref, seg_ref, h0_ref, hs_ref, final_ref, *, num_chunks,
                       dot_dtype):
    # k_ref, g_ref [T, K]; v_ref [T, BV]; seg_ref [T] | None; h0_ref, hs_ref[c], final_ref [BV, K]
    def step(c, state):
        t0 = pl.multiple_of(c * CHUNK, CHUNK)
        rows = pl.ds(t0, CHUNK)
        hs_ref[c] = state.astype(hs_ref.dtype)
        b, b_last = chunk_total_gate(g_ref, t0)
        k_to_end = load_f32(k_ref, rows) * jnp.exp(b_last - b)
        state = state * jnp.exp(b_last)
        if seg_ref is not None:
            before, last = segment_bounds(seg_ref, t0)
            k_to_end = jnp.where((seg_ref[rows] == last)[:, None], k_to_end, 0.0)
            state = jnp.where((before == last)[:, None], state, 0.0)
        return state + matmul(v_ref[rows, :], k_to_end, dot_dtype, trans_a=True)

    state = (jnp.zeros(final_ref.shape, jnp.float32) if h0_ref is None
             else h0_ref[...].astype(jnp.float32))
    final_ref[...] = lax.fori_loop(0, num_chunks, step, state)


def _chunk_output_kernel(q_ref, k_ref, v_ref, g_ref, seg_ref, h_ref, o_ref, *, scale, dot_dtype):
    # q/k/g_ref [CHUNK, K]; v_ref, o_ref [CHUNK, V]; seg_ref [T] | None; h_ref [V, K]
    t0 = pl.program_id(2) * CHUNK
    b, b_last = chunk_total_gate(g_ref, 0)
    mild = decays_mildly(b_last)
    args = (q_ref, k_ref, v_ref, seg_ref, h_ref, o_ref, t0, scale, dot_dtype)
    pl.when(mild)(lambda: _outputs_whole_chunk(b, *args))
    pl.when(jnp.logical_not(mild))(lambda: _outputs_by_sub_chunk(g_ref, *args))


def _outputs_whole_chunk(b, q_ref, k_ref, v_ref, seg_ref, h_ref, o_ref, t0, scale, dot_dtype):
    rows = pl.ds(0, CHUNK)
    q_from_start = load_f32(q_ref, rows) * jnp.exp(b)
    scores = matmul(q_from_start, load_f32(k_ref, rows) * jnp.exp(-b), dot_dtype, trans_b=True)
    keep = causal_mask(CHUNK)
    if seg_ref is not None:
        seg = seg_ref[pl.ds(t0, CHUNK)]
        before, _ = segment_bounds(seg_ref, t0)
        keep &= seg[:, None] == seg[None, :]
        q_from_start = jnp.where((seg == before)[:, None], q_from_start, 0.0)
    out = matmul(q_from_start, h_ref[...], dot_dtype, trans_b=True)
    out += matmul(jnp.where(keep, scores, 0.0), v_ref[rows, :], dot_dtype)
    o_ref[rows, :] = (scale * out).astype(o_ref.dtype)


def _outputs_by_sub_chunk(g_ref, q_ref, k_ref, v_ref, seg_ref, h_ref, o_ref, t0, scale, dot_dtype):
    state = h_ref[...]
    b, bound = cumulative_gates(g_ref, 0)
    q = [load_f32(q_ref, tile_rows(0, s)) for s in range(NUM_SUB)]
    k = [load_f32(k_ref, tile_rows(0, s)) for s in range(NUM_SUB)]
    v = [v_ref[tile_rows(0, s), :] for s in range(NUM_SUB)]
    if seg_ref is not None:
        seg = [seg_ref[tile_rows(t0, s)] for s in range(NUM_SUB)]
        before, _ = segment_bounds(seg_ref, t0)
    for i in range(NUM_SUB):
        q_from_start = q[i] * jnp.exp(b[i])
        if seg_ref is not None:
            q_from_start = jnp.where((seg[i] == before)[:, None], q_from_start, 0.0)
        out = matmul(q_from_start, state, dot_dtype, trans_b=True)
        q_rel = q[i] * jnp.exp(b[i] - bound[i])
        for j in range(i):
            scores = matmul(q_rel, k[j] * jnp.exp(bound[i] - b[j]), dot_dtype, trans_b=True)
            if seg_ref is not None:
                scores = jnp.where(seg[i][:, None] == seg[j][None, :], scores, 0.0)
            out += matmul(scores, v[j], dot_dtype)
        scores = jnp.sum(q[i][:, None, :] * k[i][None, :, :] * pair_decay(b[i]), axis=2)
        keep = causal_mask(scores.shape[0])
        if seg_ref is not None:
            keep &= seg[i][:, None] == seg[i][None, :]
        out += matmul(jnp.where(keep, scores, 0.0), v[i], dot_dtype)
        o_ref[tile_rows(0, i), :] = (scale * out).astype(o_ref.dtype)


def state_pass(k, v, g, seg, h0_t, *, dot_dtype, block_v, interpret, num_warps=4, num_stages=2):
    """``(hs [B, H, NT, V, K], final [B, H, V, K])``: states entering each chunk and leaving the last.

    Both transposed; ``hs`` in the matmul operand dtype (the only form its readers use),
    the final state float32.
    """
    kernel = functools.partial(_state_pass_kernel, dot_dtype=dot_dtype)
    return sequential_state_call(kernel, k, v, g, seg, h0_t, block_v=block_v, dot_dtype=dot_dtype,
                                 num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                                 name="gla_state_pass")


def chunk_outputs(q, k, v, g, seg, hs, *, scale, dot_dtype, interpret, num_warps=4, num_stages=2):
    """``o [B, T, H, V]`` in v's dtype from the per-chunk states ``hs``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunk_spec = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda b, h, c: (b, c, h, 0))
    kernel = functools.partial(_chunk_output_kernel, scale=scale, dot_dtype=dot_dtype)
    return pl.pallas_call(
        kernel,
        grid=(B, H, T // CHUNK),
        in_specs=[
            chunk_spec(K), chunk_spec(K), chunk_spec(V), chunk_spec(K),
            None if seg is None else pl.BlockSpec((None, T), lambda b, h, c: (b, 0)),
            pl.BlockSpec((None, None, None, V, K), lambda b, h, c: (b, h, c, 0, 0)),
        ],
        out_specs=chunk_spec(V),
        out_shape=jax.ShapeDtypeStruct((B, T, H, V), v.dtype),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="gla_chunk_outputs",
    )(q, k, v, g, seg, hs)
