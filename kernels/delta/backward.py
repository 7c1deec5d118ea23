"""Delta-rule backward: a reverse state-gradient pass, then all chunks' gradients in parallel.

Per chunk (notation of ``forward.py``; ``dS'`` the gradient of the state leaving it,
``D_o = scale * do``, ``P = q k^T * D``):

- ``state_grad_pass`` (chunks in reverse): ``dv' = P^T D_o + (n e^{b_last-b} k) dS'`` and
  ``dS = (m e^b q)^T D_o + gamma dS' - W^T dv'``;
- ``chunk_grads``: two kernels, one program per chunk each, one per path from the chunk's inputs
  to the loss (in one kernel, about ten live ``[C, C]`` float32 tiles spilled registers at 4 warps):

  - the output path, ``o = (m e^b q) S + P v'`` and ``S' = gamma S + (n e^{b_last-b} k)^T v'``:
    ``dq``, and its terms of ``dk`` and ``dg``;
  - the WY path, through ``[W | U] = X [kb | vb]`` with ``kb = diag(beta m e^b) K``,
    ``vb = diag(beta) V``: ``d vb = X^T dv'``, ``d kb = -X^T dv' S^T``, ``dX = dv' (vb - kb S)^T``,
    ``dA = -X^T dX X^T``, then ``A``'s factors: ``dv``, ``dbeta``, and its terms of ``dk`` and ``dg``.

  The output path writes its ``dk`` and ``dg`` terms in float32; the WY path adds its own and
  writes the sums in the inputs' dtypes. The gates get a
  gradient through every factor they enter (``_gate_grad``): each pair factor ``D[t, s]`` sends
  ``dD D`` to ``b_t`` and minus that to ``b_s``.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..common import CHUNK, load_f32, matmul
from .forward import (boundary_factors, call, chunk_spec, chunk_state_spec, if_given, load_gates,
                      pair_decays, segment_spec, sequence_spec, strictly_lower)


def _state_grad_kernel(q_ref, k_ref, g_ref, seg_ref, w_ref, do_ref, dht_ref, dhs_ref, dv_new_ref,
                       dh0_ref, *, scale, num_chunks, dot_dtype):
    # q/k/w_ref [T, K]; do_ref, dv_new_ref [T, BV]; g_ref, seg_ref [T] | None; dht, dhs[c], dh0 [K, BV]
    def step(i, dstate):
        c = num_chunks - 1 - i
        t0 = pl.multiple_of(c * CHUNK, CHUNK)
        rows = pl.ds(t0, CHUNK)
        dhs_ref[c] = dstate.astype(dhs_ref.dtype)
        g = load_gates(g_ref, rows)
        from_start, to_end, carry = boundary_factors(g, seg_ref, t0)
        q, k = load_f32(q_ref, rows), load_f32(k_ref, rows)
        d_out = scale * load_f32(do_ref, rows)
        scores = matmul(q, k, dot_dtype, trans_b=True) * pair_decays(g, seg_ref, t0)
        dv_new = matmul(scores, d_out, dot_dtype, trans_a=True)
        dv_new += matmul(k * to_end[:, None], dstate, dot_dtype)
        dv_new_ref[rows, :] = dv_new.astype(dv_new_ref.dtype)
        dstate = carry * dstate + matmul(q * from_start[:, None], d_out, dot_dtype, trans_a=True)
        return dstate - matmul(w_ref[rows, :], dv_new, dot_dtype, trans_a=True)

    dh0_ref[...] = lax.fori_loop(0, num_chunks, step, dht_ref[...].astype(jnp.float32))


def _output_path_kernel(q_ref, k_ref, g_ref, seg_ref, h_ref, dh_ref, v_new_ref, do_ref, dq_ref, dk_ref,
                        dg_ref, *, scale, dot_dtype):
    # [C, K]: q, k, dq, dk (partial); [C, V]: v_new, do; [C]: g, dg (partial);
    # h_ref, dh_ref [K, V] (state entering and gradient of the state leaving)
    t0 = pl.program_id(2) * CHUNK
    rows = pl.ds(0, CHUNK)
    mm = functools.partial(matmul, dot_dtype=dot_dtype)
    g = load_gates(g_ref, rows)
    q, k, v_new = load_f32(q_ref, rows), load_f32(k_ref, rows), load_f32(v_new_ref, rows)
    state, dstate = h_ref[...].astype(jnp.float32), dh_ref[...].astype(jnp.float32)
    d_out = scale * load_f32(do_ref, rows)
    from_start, to_end, carry = boundary_factors(g, seg_ref, t0)

    # o = (m e^b q) S + (q k^T * D) v'
    dqk = mm(d_out, v_new, trans_b=True) * pair_decays(g, seg_ref, t0)
    dq_state = mm(d_out, state, trans_b=True)
    dq_ref[rows, :] = (from_start[:, None] * dq_state + mm(dqk, k)).astype(dq_ref.dtype)
    # S' = gamma S + (n e^{b_last - b} k)^T v'
    dk_end = mm(v_new, dstate, trans_b=True)
    dk_ref[rows, :] = mm(dqk, q, trans_a=True) + to_end[:, None] * dk_end
    if dg_ref is not None:
        dg_ref[rows] = _gate_grad(dqk * mm(q, k, trans_b=True),
                                  jnp.sum(q * dq_state, axis=1) * from_start,
                                  to_end_grad=jnp.sum(k * dk_end, axis=1) * to_end,
                                  carried=jnp.sum(carry) * jnp.sum(state * dstate))


def _wy_path_kernel(k_ref, v_ref, beta_ref, g_ref, seg_ref, x_ref, h_ref, dv_new_ref, dk_out_ref, dg_out_ref,
                    dv_ref, dbeta_ref, dk_ref, dg_ref, *, dot_dtype):
    # [C, K]: k, dk_out (the output path's terms, float32), dk; [C, V]: v, dv_new, dv;
    # [C]: beta, g, dg_out (as dk_out), dbeta, dg; x_ref [C, C]; h_ref [K, V] (state entering)
    t0 = pl.program_id(2) * CHUNK
    rows = pl.ds(0, CHUNK)
    mm = functools.partial(matmul, dot_dtype=dot_dtype)
    g = load_gates(g_ref, rows)
    k, v, dv_new = load_f32(k_ref, rows), load_f32(v_ref, rows), load_f32(dv_new_ref, rows)
    beta = beta_ref[rows].astype(jnp.float32)
    x, state = x_ref[...], h_ref[...].astype(jnp.float32)
    from_start, _, _ = boundary_factors(g, seg_ref, t0)
    decay = pair_decays(g, seg_ref, t0)

    # v' = X vb - X kb S
    kb = (beta * from_start)[:, None] * k
    dvb = mm(x, dv_new, trans_a=True)
    dkb = -mm(x, mm(dv_new, state, trans_b=True), trans_a=True)
    dx = mm(dv_new, beta[:, None] * v - mm(kb, state), trans_b=True)
    da = -mm(x, mm(dx, x, trans_b=True), trans_a=True)
    # A = strict_lower(beta_t (k_t.k_s) D[t, s])
    kk = mm(k, k, trans_b=True)
    dkk = da * beta[:, None] * strictly_lower(decay)
    dv_ref[rows, :] = (beta[:, None] * dvb).astype(dv_ref.dtype)
    dbeta_ref[rows] = (jnp.sum(dvb * v, axis=1) + jnp.sum(dkb * k, axis=1) * from_start
                       + jnp.sum(da * strictly_lower(kk * decay), axis=1)).astype(dbeta_ref.dtype)
    dk = mm(dkk, k) + mm(dkk, k, trans_a=True) + (beta * from_start)[:, None] * dkb
    dk_ref[rows, :] = (dk_out_ref[rows, :] + dk).astype(dk_ref.dtype)
    if dg_ref is not None:
        dg = _gate_grad(dkk * kk, jnp.sum(kb * dkb, axis=1))
        dg_ref[rows] = (dg_out_ref[rows] + dg).astype(dg_ref.dtype)


def _gate_grad(pair_grads, db, *, to_end_grad=0.0, carried=0.0):
    """``dg [C]`` from the gradients of the factors the gates enter: ``pair_grads [C, C]`` (``dD * D``
    of each pair factor; only ``s < t`` is read), ``db [C]`` (of each token's cumulative gate ``b_t``
    through its other factors), ``to_end_grad [C]`` (``dF * F`` of ``F = e^{b_last - b_s}``) and
    ``carried`` (of ``gamma``). Token j's gate enters every ``b_t`` with ``t >= j``, and
    ``e^{b_last - b_s}`` for every ``s < j``. Linear in its pieces: each kernel passes its own, and
    the partial ``dg`` add up.

    Factors that are exactly 1 must add nothing, not ``+x - x`` (float32 noise far above the true
    gradient under strong decay): so the diagonal pairs are left out, the ``e^{b_last - b_s}``
    gradients enter as a prefix sum of their own, and both sums are masked sums, not differences
    of cumulative sums.
    """
    pairs = strictly_lower(pair_grads)  # each pair factor D[t, s] sends dD D to b_t, minus it to b_s
    db = db + jnp.sum(pairs, axis=1) - jnp.sum(pairs, axis=0)
    gate, token = (lax.broadcasted_iota(jnp.int32, pairs.shape, d) for d in (0, 1))
    return carried + jnp.sum(jnp.where(token >= gate, db, to_end_grad), axis=1)


def state_grad_pass(q, k, g, seg, w, do, dht, *, scale, dot_dtype, block_v, interpret):
    """``(dhs [B, H, NT, K, V], dv_new [B, T, H, V], dh0 [B, H, K, V])``: gradients of the states
    leaving each chunk and of the written values (matmul dtype: the chunk kernels read both only as
    matmul operands), and of the initial state (float32)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    num_chunks = T // CHUNK
    state_spec = pl.BlockSpec((None, None, K, block_v), lambda b, h, iv: (b, h, 0, iv))
    return call(
        functools.partial(_state_grad_kernel, scale=scale, num_chunks=num_chunks, dot_dtype=dot_dtype),
        (B, H, V // block_v),
        [sequence_spec(T, K), sequence_spec(T, K), if_given(g, sequence_spec(T)),
         if_given(seg, segment_spec(T)), sequence_spec(T, K), sequence_spec(T, V, block_v), state_spec],
        [pl.BlockSpec((None, None, num_chunks, K, block_v), lambda b, h, iv: (b, h, 0, 0, iv)),
         sequence_spec(T, V, block_v), state_spec],
        [jax.ShapeDtypeStruct((B, H, num_chunks, K, V), dot_dtype),
         jax.ShapeDtypeStruct((B, T, H, V), dot_dtype), jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
        (q, k, g, seg, w, do, dht), name="delta_state_grad_pass", interpret=interpret)


def chunk_grads(q, k, v, beta, g, seg, x, hs, dhs, v_new, dv_new, do, *, scale, dot_dtype, interpret):
    """``(dq, dk, dv, dbeta, dg)`` in the inputs' dtypes (``dg`` None without gates)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    grid = (B, H, T // CHUNK)
    gate_spec, seg_spec = if_given(g, chunk_spec()), if_given(seg, segment_spec(T))
    state_spec = chunk_state_spec(K, V)
    like = lambda a, dtype=None: None if a is None else jax.ShapeDtypeStruct(a.shape, dtype or a.dtype)
    dq, dk_output, dg_output = call(
        functools.partial(_output_path_kernel, scale=scale, dot_dtype=dot_dtype), grid,
        [chunk_spec(K), chunk_spec(K), gate_spec, seg_spec, state_spec, state_spec, chunk_spec(V),
         chunk_spec(V)],
        [chunk_spec(K), chunk_spec(K), gate_spec],
        [like(q), like(k, jnp.float32), like(g, jnp.float32)],
        (q, k, g, seg, hs, dhs, v_new, do), name="delta_chunk_grads_output_path", interpret=interpret)
    dv, dbeta, dk, dg = call(
        functools.partial(_wy_path_kernel, dot_dtype=dot_dtype), grid,
        [chunk_spec(K), chunk_spec(V), chunk_spec(), gate_spec, seg_spec, chunk_spec(CHUNK), state_spec,
         chunk_spec(V), chunk_spec(K), gate_spec],
        [chunk_spec(V), chunk_spec(), chunk_spec(K), gate_spec],
        [like(v), like(beta), like(k), like(g)],
        (k, v, beta, g, seg, x, hs, dv_new, dk_output, dg_output), name="delta_chunk_grads_wy_path",
        interpret=interpret)
    return dq, dk, dv, dbeta, dg
