"""Delta-rule backward: a reverse state-gradient pass, then all chunks' gradients in parallel.

Per chunk (notation of ``forward.py``; ``dS'`` the gradient of the state leaving it,
``D_o = scale * do``, ``P = q k^T * D``):

- ``state_grad_pass`` (chunks in reverse): ``dv' = P^T D_o + (n e^{b_last-b} k) dS'`` and
  ``dS = (m e^b q)^T D_o + gamma dS' - W^T dv'``;
- ``chunk_grads`` (one program per chunk), through ``[W | U] = X [kb | vb]`` with
  ``kb = diag(beta m e^b) K``, ``vb = diag(beta) V``: ``d vb = X^T dv'``,
  ``d kb = -X^T dv' S^T``, ``dX = dv' (vb - kb S)^T``, ``dA = -X^T dX X^T``; then q, k, v,
  beta directly, and the gates through every factor they enter (``_gate_grad``): each pair
  factor ``D[t, s]`` sends ``dD D`` to ``b_t`` and minus that to ``b_s``.
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


def _chunk_grad_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, seg_ref, x_ref, h_ref, dh_ref, v_new_ref,
                       dv_new_ref, do_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref, *, scale,
                       dot_dtype):
    # [C, K]: q, k, dq, dk; [C, V]: v, v_new, dv_new, do, dv; [C]: beta, g, dbeta, dg;
    # x_ref [C, C]; h_ref, dh_ref [K, V] (states entering and gradient of the state leaving)
    t0 = pl.program_id(2) * CHUNK
    rows = pl.ds(0, CHUNK)
    mm = functools.partial(matmul, dot_dtype=dot_dtype)
    g = load_gates(g_ref, rows)
    q, k, v = load_f32(q_ref, rows), load_f32(k_ref, rows), load_f32(v_ref, rows)
    beta = beta_ref[rows].astype(jnp.float32)
    x, state, dstate = x_ref[...], h_ref[...].astype(jnp.float32), dh_ref[...].astype(jnp.float32)
    v_new, dv_new = load_f32(v_new_ref, rows), load_f32(dv_new_ref, rows)
    d_out = scale * load_f32(do_ref, rows)
    from_start, to_end, carry = boundary_factors(g, seg_ref, t0)
    decay = pair_decays(g, seg_ref, t0)

    # o = (m e^b q) S + (q k^T * D) v'
    qk = mm(q, k, trans_b=True)
    dqk = mm(d_out, v_new, trans_b=True) * decay
    dq_state = mm(d_out, state, trans_b=True)
    dq = from_start[:, None] * dq_state + mm(dqk, k)
    dk = mm(dqk, q, trans_a=True)
    # S' = gamma S + (n e^{b_last - b} k)^T v'
    dk_end = mm(v_new, dstate, trans_b=True)
    dk += to_end[:, None] * dk_end
    # v' = X vb - X kb S
    kb = (beta * from_start)[:, None] * k
    dvb = mm(x, dv_new, trans_a=True)
    dkb = -mm(x, mm(dv_new, state, trans_b=True), trans_a=True)
    dx = mm(dv_new, beta[:, None] * v - mm(kb, state), trans_b=True)
    da = -mm(x, mm(dx, x, trans_b=True), trans_a=True)
    # A = strict_lower(beta_t (k_t.k_s) D[t, s])
    kk = mm(k, k, trans_b=True)
    kk_decay = strictly_lower(kk * decay)
    dkk = da * beta[:, None] * strictly_lower(decay)
    dk += mm(dkk, k) + mm(dkk, k, trans_a=True) + (beta * from_start)[:, None] * dkb
    dv_ref[rows, :] = (beta[:, None] * dvb).astype(dv_ref.dtype)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dbeta_ref[rows] = (jnp.sum(dvb * v, axis=1) + jnp.sum(dkb * k, axis=1) * from_start
                       + jnp.sum(da * kk_decay, axis=1)).astype(dbeta_ref.dtype)
    if dg_ref is not None:
        dg_ref[rows] = _gate_grad(q, k, qk, kk, dqk, dkk, dq_state, dk_end, kb, dkb, from_start,
                                  to_end, carry, state, dstate).astype(dg_ref.dtype)


def _gate_grad(q, k, qk, kk, dqk, dkk, dq_state, dk_end, kb, dkb, from_start, to_end, carry, state,
               dstate):
    """``dg [C]`` from ``db``, the gradient of each token's cumulative gate ``b_t``: token j's gate
    enters every ``b_t`` with ``t >= j``, and ``e^{b_last - b_s}`` for every ``s < j``.

    Factors that are exactly 1 must add nothing, not ``+x - x`` (float32 noise far above the true
    gradient under strong decay): so the diagonal pairs are left out, the ``e^{b_last - b_s}``
    gradients enter as a prefix sum of their own, and both sums are masked sums, not differences
    of cumulative sums.
    """
    pairs = strictly_lower(dqk * qk + dkk * kk)  # dD * D for every pair factor s < t
    db = (jnp.sum(pairs, axis=1) - jnp.sum(pairs, axis=0) + jnp.sum(q * dq_state, axis=1) * from_start
          + jnp.sum(kb * dkb, axis=1))
    to_end_grad = jnp.sum(k * dk_end, axis=1) * to_end
    carried = jnp.sum(carry) * jnp.sum(state * dstate)
    gate, token = (lax.broadcasted_iota(jnp.int32, pairs.shape, d) for d in (0, 1))
    return carried + jnp.sum(jnp.where(token >= gate, db[None, :], to_end_grad[None, :]), axis=1)


def state_grad_pass(q, k, g, seg, w, do, dht, *, scale, dot_dtype, block_v, interpret):
    """``(dhs [B, H, NT, K, V], dv_new [B, T, H, V], dh0 [B, H, K, V])``: gradients of the states
    leaving each chunk and of the written values (matmul dtype: the chunk kernel reads both only as
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
    return call(
        functools.partial(_chunk_grad_kernel, scale=scale, dot_dtype=dot_dtype),
        (B, H, T // CHUNK),
        [chunk_spec(K), chunk_spec(K), chunk_spec(V), chunk_spec(), if_given(g, chunk_spec()),
         if_given(seg, segment_spec(T)), chunk_spec(CHUNK), chunk_state_spec(K, V),
         chunk_state_spec(K, V), chunk_spec(V), chunk_spec(V), chunk_spec(V)],
        [chunk_spec(K), chunk_spec(K), chunk_spec(V), chunk_spec(), if_given(g, chunk_spec())],
        [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v, beta, g)],
        (q, k, v, beta, g, seg, x, hs, dhs, v_new, dv_new, do), name="delta_chunk_grads",
        interpret=interpret)
