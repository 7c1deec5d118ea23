"""GLA backward: a reverse state-gradient pass, then all chunks' gradients in parallel.

With ``D = scale * do`` and, per chunk, ``b`` the gate cumsum from the chunk start,
``S`` / ``S'`` the states entering / leaving it (forward's ``hs``) and ``dS'`` the
gradient of ``S'``:

- ``dS = gate * e^{b_last} dS' + (m * q e^b)^T D`` (``state_grad_pass``, reverse order);
- ``dv = A^T D + (n * k e^{b_last - b}) dS'``, ``dA = tril(D v^T)``,
  ``dq = m * e^b (D S^T) + [dA (k e^{-b})] e^b``, ``dk = n * e^{b_last - b} (v dS') +
  [dA^T (q e^b)] e^{-b}`` (pairs grouped by sub-chunk exactly as in the forward);
- every term depends on the chunk's gates only through ``b_i - b_j`` products, so the
  gradient of the cumulative gate is ``db = q dq - k dk``, plus ``sum_v dS' * S'`` at
  the chunk's last token (``S'`` scales with ``e^{b_last}``); ``dg`` is the reverse
  cumulative sum of ``db`` within the chunk.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..common import (CHUNK, NUM_SUB, causal_mask, chunk_total_gate, compiler_params,
                      cumulative_gates, decays_mildly, load_f32, matmul, pair_decay, segment_bounds,
                      sequential_state_call, tile_rows)


def _state_grad_pass_kernel(q_ref, do_ref, g_ref, seg_ref, dht_ref, dhs_ref, dh0_ref, *, scale,
                            num_chunks, dot_dtype):
    # q_ref, g_ref [T, K]; do_ref [T, BV]; seg_ref [T] | None; dht_ref, dhs_ref[c], dh0_ref [BV, K]
    def step(i, dstate):
        c = num_chunks - 1 - i
        t0 = pl.multiple_of(c * CHUNK, CHUNK)
        rows = pl.ds(t0, CHUNK)
        dhs_ref[c] = dstate.astype(dhs_ref.dtype)
        b, b_last = chunk_total_gate(g_ref, t0)
        q_from_start = load_f32(q_ref, rows) * (scale * jnp.exp(b))
        dstate = dstate * jnp.exp(b_last)
        if seg_ref is not None:
            before, last = segment_bounds(seg_ref, t0)
            q_from_start = jnp.where((seg_ref[rows] == before)[:, None], q_from_start, 0.0)
            dstate = jnp.where((before == last)[:, None], dstate, 0.0)
        return dstate + matmul(do_ref[rows, :], q_from_start, dot_dtype, trans_a=True)

    dh0_ref[...] = lax.fori_loop(0, num_chunks, step, dht_ref[...].astype(jnp.float32))


def _chunk_grad_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, seg_ref, h_ref, dh_next_ref,
                       dq_ref, dk_ref, dv_ref, dg_ref, *, scale, dot_dtype):
    # q/k/g and dq/dk/dg refs [CHUNK, K]; v/do/dv refs [CHUNK, V]; h refs [V, K]
    t0 = pl.program_id(2) * CHUNK
    b, b_last = chunk_total_gate(g_ref, 0)
    mild = decays_mildly(b_last)
    refs = (q_ref, k_ref, v_ref, g_ref, do_ref, seg_ref, h_ref, dh_next_ref)
    outs = (dq_ref, dk_ref, dv_ref, dg_ref)
    pl.when(mild)(lambda: _grads_whole_chunk(b, b_last, t0, scale, dot_dtype, *refs, *outs))
    pl.when(jnp.logical_not(mild))(lambda: _grads_by_sub_chunk(t0, scale, dot_dtype, *refs, *outs))


def _store_grads(rows, q, k, dq, dk, dv, suffix, dq_ref, dk_ref, dv_ref, dg_ref):
    """Store one row block; ``dg`` is ``suffix`` plus the reverse cumsum of ``q dq - k dk``."""
    db = q * dq - k * dk
    total = jnp.sum(db, axis=0, keepdims=True)
    dg_ref[rows, :] = (suffix + total - jnp.cumsum(db, axis=0) + db).astype(dg_ref.dtype)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return suffix + total


def _grad_last_gate(state, dstate, b_last, carried, k_tiles, dk_end_tiles):
    """``sum_v dS' * S'`` (``[1, K]``), the gradient of the chunk's total gate through the state
    it leaves, without reading ``S'``: from ``S' = carried e^{b_last} S + (n k e^{b_last-b})^T v``,
    the second term's share is ``sum_j k_j dk_end_j``, ``dk_end`` the k-gradient through ``S'``."""
    f32 = lambda x: x.astype(jnp.float32)
    grad = carried * jnp.exp(b_last) * jnp.sum(f32(state) * f32(dstate), axis=0, keepdims=True)
    for k, dk_end in zip(k_tiles, dk_end_tiles):
        grad += jnp.sum(k * dk_end, axis=0, keepdims=True)
    return grad


def _grads_whole_chunk(b, b_last, t0, scale, dot_dtype, q_ref, k_ref, v_ref, g_ref, do_ref, seg_ref,
                       h_ref, dh_next_ref, dq_ref, dk_ref, dv_ref, dg_ref):
    rows = pl.ds(0, CHUNK)
    state, dstate = h_ref[...], dh_next_ref[...]
    q, k, v = load_f32(q_ref, rows), load_f32(k_ref, rows), load_f32(v_ref, rows)
    d_out = scale * load_f32(do_ref, rows)
    from_start, to_start, to_end = jnp.exp(b), jnp.exp(-b), jnp.exp(b_last - b)
    q_from_start, k_to_start = q * from_start, k * to_start
    keep = causal_mask(CHUNK)
    state_from_start, carried = from_start, 1.0
    if seg_ref is not None:
        seg = seg_ref[pl.ds(t0, CHUNK)]
        before, last = segment_bounds(seg_ref, t0)
        keep &= seg[:, None] == seg[None, :]
        state_from_start = jnp.where((seg == before)[:, None], from_start, 0.0)
        to_end = jnp.where((seg == last)[:, None], to_end, 0.0)
        carried = (before == last)[:, None].astype(jnp.float32)
    scores = jnp.where(keep, matmul(q_from_start, k_to_start, dot_dtype, trans_b=True), 0.0)
    dscores = jnp.where(keep, matmul(d_out, v, dot_dtype, trans_b=True), 0.0)
    dv = matmul(scores, d_out, dot_dtype, trans_a=True)
    dv += matmul(k * to_end, dstate, dot_dtype, trans_b=True)
    dq = state_from_start * matmul(d_out, state, dot_dtype)
    dq += from_start * matmul(dscores, k_to_start, dot_dtype)
    dk_end = to_end * matmul(v, dstate, dot_dtype)
    dk = dk_end + to_start * matmul(dscores, q_from_start, dot_dtype, trans_a=True)
    suffix = _grad_last_gate(state, dstate, b_last, carried, [k], [dk_end])
    _store_grads(rows, q, k, dq, dk, dv, suffix, dq_ref, dk_ref, dv_ref, dg_ref)


def _grads_by_sub_chunk(t0, scale, dot_dtype, q_ref, k_ref, v_ref, g_ref, do_ref, seg_ref, h_ref,
                        dh_next_ref, dq_ref, dk_ref, dv_ref, dg_ref):
    state, dstate = h_ref[...], dh_next_ref[...]
    b, bound = cumulative_gates(g_ref, 0)
    b_last = bound[NUM_SUB]
    tiles = lambda ref: [load_f32(ref, tile_rows(0, s)) for s in range(NUM_SUB)]
    q, k, v = tiles(q_ref), tiles(k_ref), tiles(v_ref)
    d_out = [scale * x for x in tiles(do_ref)]
    carried = 1.0
    if seg_ref is not None:
        seg = [seg_ref[tile_rows(t0, s)] for s in range(NUM_SUB)]
        before, last = segment_bounds(seg_ref, t0)
        carried = (before == last)[:, None].astype(jnp.float32)

    dq, dk, dv = [], [], []
    for i in range(NUM_SUB):  # contributions through the states entering and leaving the chunk
        from_start = jnp.exp(b[i])
        to_end = jnp.exp(b_last - b[i])
        if seg_ref is not None:
            from_start = jnp.where((seg[i] == before)[:, None], from_start, 0.0)
            to_end = jnp.where((seg[i] == last)[:, None], to_end, 0.0)
        dq.append(from_start * matmul(d_out[i], state, dot_dtype))
        dk.append(to_end * matmul(v[i], dstate, dot_dtype))
        dv.append(matmul(k[i] * to_end, dstate, dot_dtype, trans_b=True))
    suffix = _grad_last_gate(state, dstate, b_last, carried, k, dk)

    for i in range(NUM_SUB):  # intra-chunk pairs (row sub-chunk i, column sub-chunk j <= i)
        q_rel = q[i] * jnp.exp(b[i] - bound[i])
        dq_rel = jnp.zeros_like(q_rel)
        for j in range(i):
            k_decay = jnp.exp(bound[i] - b[j])
            k_rel = k[j] * k_decay
            scores = matmul(q_rel, k_rel, dot_dtype, trans_b=True)
            dscores = matmul(d_out[i], v[j], dot_dtype, trans_b=True)
            if seg_ref is not None:
                same = seg[i][:, None] == seg[j][None, :]
                scores, dscores = jnp.where(same, scores, 0.0), jnp.where(same, dscores, 0.0)
            dv[j] += matmul(scores, d_out[i], dot_dtype, trans_a=True)
            dq_rel += matmul(dscores, k_rel, dot_dtype)
            dk[j] += k_decay * matmul(dscores, q_rel, dot_dtype, trans_a=True)
        dq[i] += jnp.exp(b[i] - bound[i]) * dq_rel

        decay = pair_decay(b[i])
        keep = causal_mask(decay.shape[0])
        if seg_ref is not None:
            keep &= seg[i][:, None] == seg[i][None, :]
        scores = jnp.where(keep, jnp.sum(q[i][:, None, :] * k[i][None, :, :] * decay, axis=2), 0.0)
        dscores = jnp.where(keep, matmul(d_out[i], v[i], dot_dtype, trans_b=True), 0.0)
        dv[i] += matmul(scores, d_out[i], dot_dtype, trans_a=True)
        dq[i] += jnp.sum(dscores[:, :, None] * k[i][None, :, :] * decay, axis=1)
        dk[i] += jnp.sum(dscores[:, :, None] * q[i][:, None, :] * decay, axis=0)

    for i in reversed(range(NUM_SUB)):
        suffix = _store_grads(tile_rows(0, i), q[i], k[i], dq[i], dk[i], dv[i], suffix,
                              dq_ref, dk_ref, dv_ref, dg_ref)


def state_grad_pass(q, do, g, seg, dht, *, scale, dot_dtype, block_v, interpret, num_warps=4,
                    num_stages=2):
    """``(dhs [B, H, NT, V, K], dh0 [B, H, V, K])``: gradients of the states leaving each chunk
    (matmul operand dtype) and of the initial state (float32), transposed."""
    kernel = functools.partial(_state_grad_pass_kernel, scale=scale, dot_dtype=dot_dtype)
    return sequential_state_call(kernel, q, do, g, seg, dht, block_v=block_v, dot_dtype=dot_dtype,
                                 num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                                 name="gla_state_grad_pass")


def chunk_grads(q, k, v, g, do, seg, hs, dhs, *, scale, dot_dtype, interpret, num_warps=4,
                num_stages=2):
    """``(dq, dk, dv, dg)`` in the inputs' dtypes, from the states and their gradients."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunk_spec = lambda d: pl.BlockSpec((None, CHUNK, None, d), lambda b, h, c: (b, c, h, 0))
    state_spec = pl.BlockSpec((None, None, None, V, K), lambda b, h, c: (b, h, c, 0, 0))
    kernel = functools.partial(_chunk_grad_kernel, scale=scale, dot_dtype=dot_dtype)
    return pl.pallas_call(
        kernel,
        grid=(B, H, T // CHUNK),
        in_specs=[
            chunk_spec(K), chunk_spec(K), chunk_spec(V), chunk_spec(K), chunk_spec(V),
            None if seg is None else pl.BlockSpec((None, T), lambda b, h, c: (b, 0)),
            state_spec, state_spec,
        ],
        out_specs=[chunk_spec(K), chunk_spec(K), chunk_spec(V), chunk_spec(K)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, g)],
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="gla_chunk_grads",
    )(q, k, v, g, do, seg, hs, dhs)
