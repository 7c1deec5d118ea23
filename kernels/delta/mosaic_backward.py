"""Delta-rule backward on Mosaic GPU (Hopper: TMA, wgmma), bf16: ``backward.py``'s three kernels.

- ``state_grad_pass_mosaic``: the reverse pass over chunks, the state gradient in registers;

then ``chunk_grads``'s two kernels, one program per chunk each:

- ``output_path_grads``: ``dq``, and the output path's terms of ``dk`` (float32) and of the gates;
- ``wy_path_grads``: ``dv``, ``dbeta``, ``dk`` (adding the output path's terms) and the WY path's
  terms of the gates.

The formulas are ``backward.py``'s. Products whose transpose is needed are formed transposed
(``(v' do^T) * D^T`` beside ``(do v'^T) * D``): register operands of wgmma cannot be transposed.
Gate gradients leave the kernels per token, as gradients of the cumulative gates ``b_t`` (``db``,
the diagonal pair factors left out as in ``backward._gate_grad``) and of the chunk-end factors
``e^{b_last - b_s}`` (``d_to_end``, the ``gamma`` term added at the chunk's last token);
``gate_grads`` turns them into gradients of the log gates with masked prefix and suffix sums.
Per-token vectors come and go ``[B, T, Hp]`` (see ``mosaic_forward``): read from slabs of every head,
written as the program's strided column.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..common import CHUNK
from ..mosaic import (bcast_cols, bcast_rows, chunk_pipeline, chunk_windows, load_chunk, load_tile, matmul, matmuls,
                      named_refs, same_document, scoped_kernel, smem_tile)
from .mosaic_forward import (boundary_factors, chunk_iotas, mosaic_state_block_v, pair_decays, pair_mask,
                             pass_scratch, rows_vector, scaled_rows, store_state)


def _as_rows(vec, row, col):
    """A COLS vector as a ROWS one: the diagonal of its column broadcast."""
    return jnp.sum(jnp.where(row == col, bcast_cols(vec, vec.shape[0]), 0.0), axis=1)


def _pair_gate_grads(pairs, row, col):
    """Per token ``t``: the pair factors' gradients ``dD D`` reaching ``b_t`` (row sums) minus those
    reaching it as ``b_s`` (column sums); ``pairs`` strictly lower."""
    return jnp.sum(pairs, axis=1) - _as_rows(jnp.sum(pairs, axis=0), row, col)


def gate_grads(db, d_to_end):
    """``dg [B, T, H]`` float32 from ``db``, ``d_to_end`` ``[B, T, H]`` (see the module doc): token
    ``j``'s log gate enters ``b_t`` for ``t >= j`` in its chunk, and ``e^{b_last - b_s}`` for ``s < j``."""
    B, T, H = db.shape
    db, d_to_end = (x.reshape(B, T // CHUNK, CHUNK, H) for x in (db, d_to_end))
    later = jnp.flip(jnp.cumsum(jnp.flip(db, 2), axis=2), 2)
    # the exclusive prefix sum shifted, not cumsum minus the term: no +x - x noise under strong decay
    earlier = jnp.cumsum(jnp.pad(d_to_end[:, :, :-1], [(0, 0), (0, 0), (1, 0), (0, 0)]), axis=2)
    return (later + earlier).reshape(B, T, H)


def output_path_grads(q, k, v_new, do, b, rel, hs, dhs, *, scale, interpret):
    """``(dq [B,T,H,K] bf16, dk [B,T,H,K] float32, db [B,T,Hp], d_to_end [B,T,Hp])`` (the last two
    float32, None without gates; ``b [B,T,Hp]`` as ``db``): ``o = (m e^b q) S + (q k^T * D) v'`` and
    ``S' = gamma S + (n e^{b_last - b} k)^T v'`` differentiated per chunk, ``dhs`` the gradients of
    the states leaving the chunks."""
    B, T, H, K = q.shape
    V = v_new.shape[-1]
    has_gates, has_seg = b is not None, rel is not None
    dtype = jnp.bfloat16

    def body(*refs):
        (q_ref, k_ref, v_new_ref, do_ref, b_ref, seg_ref, hs_ref, dhs_ref, dq_ref, dk_ref, db_ref, d_to_end_ref,
         q_s, k_s, v_new_s, do_s, b_s, seg_s, h_s, dh_s, dq_s, dk_s, bars) = named_refs(
            refs, "q k v_new do b seg hs dhs dq dk db d_to_end q_s k_s v_new_s do_s b_s seg_s h_s dh_s dq_s dk_s "
            "bars", b=has_gates, seg=has_seg, db=has_gates, d_to_end=has_gates)
        ci, hi = lax.axis_index("chunks"), lax.axis_index("heads")
        at = chunk_windows(lax.axis_index("batch"), hi)
        copies = [(at.tokens(q_ref), q_s), (at.tokens(k_ref), k_s), (at.tokens(v_new_ref), v_new_s),
                  (at.tokens(do_ref), do_s), (at.state(hs_ref), h_s), (at.state(dhs_ref), dh_s)]
        copies += [(at.token_rows(b_ref), b_s)] if has_gates else []
        copies += [(at.token_rows(seg_ref), seg_s)] if has_seg else []
        load_chunk(copies, ci, bars)

        row, col, token = chunk_iotas()
        b_t, rel = rows_vector(b_s, head=hi), rows_vector(seg_s)
        from_start, to_end, carry = boundary_factors(b_t, rel, token)
        keep, keep_t = row >= col, row <= col  # P's pairs, and P^T's
        if has_seg:
            same_doc = same_document(rel, row, col)
            keep, keep_t = keep & same_doc, keep_t & same_doc
        mm = lambda a, b_, shape: matmul(a, b_, shape, interpret=interpret)

        # o = (m e^b q) S + P v', P = q k^T * D
        d_scores = scale * mm(do_s, v_new_s.T, (CHUNK, CHUNK))  # dP
        if has_gates:
            d_scores = d_scores * pair_decays(b_t, row, col)
        d_scores = jnp.where(keep, d_scores, 0.0)
        dq_state = scale * mm(do_s, h_s.T, (CHUNK, K))
        dq = mm(d_scores.astype(dtype), k_s, (CHUNK, K), ) + scaled_rows(dq_state, from_start)
        dq_s[...] = dq.astype(dtype)
        if has_gates:
            pairs = jnp.where(row > col, d_scores * mm(q_s, k_s.T, (CHUNK, CHUNK)), 0.0)
            db = _pair_gate_grads(pairs, row, col)
            db += jnp.sum(q_s[...].astype(jnp.float32) * dq_state, axis=1) * from_start
        # S' = gamma S + (n e^{b_last - b} k)^T v'
        dk_end = mm(v_new_s, dh_s.T, (CHUNK, K))
        d_scores_t = scale * mm(v_new_s, do_s.T, (CHUNK, CHUNK))  # dP^T
        if has_gates:
            d_scores_t = d_scores_t * pair_decays(-b_t, row, col)
        d_scores_t = jnp.where(keep_t, d_scores_t, 0.0)
        dk_s[...] = mm(d_scores_t.astype(dtype), q_s, (CHUNK, K)) + scaled_rows(dk_end, to_end)
        if has_gates:
            d_to_end = jnp.sum(k_s[...].astype(jnp.float32) * dk_end, axis=1) * to_end
            state_products = h_s[...].astype(jnp.float32) * dh_s[...].astype(jnp.float32)
            carried = carry * jnp.sum(jnp.sum(state_products, axis=1))  # one axis at a time (Mosaic)
            at.tokens(db_ref)(ci)[...] = db + jnp.where(token == CHUNK - 1, carried, 0.0)
            at.tokens(d_to_end_ref)(ci)[...] = d_to_end
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_s, at.tokens(dq_ref)(ci))
        plgpu.copy_smem_to_gmem(dk_s, at.tokens(dk_ref)(ci))
        plgpu.wait_smem_to_gmem(0)

    operands = [q, k, v_new, do] + ([b] if has_gates else []) + ([rel] if has_seg else []) + [hs, dhs]
    out_type = [jax.ShapeDtypeStruct((B, T, H, K), dtype), jax.ShapeDtypeStruct((B, T, H, K), jnp.float32)]
    out_type += [jax.ShapeDtypeStruct(b.shape, jnp.float32)] * 2 if has_gates else []
    scratch = [smem_tile((CHUNK, K), dtype), smem_tile((CHUNK, K), dtype), smem_tile((CHUNK, V), dtype),
               smem_tile((CHUNK, V), dtype), plgpu.SMEM((CHUNK, b.shape[-1]), jnp.float32) if has_gates else None,
               plgpu.SMEM((CHUNK,), jnp.int32) if has_seg else None,
               smem_tile((K, V), dtype), smem_tile((K, V), dtype), smem_tile((CHUNK, K), dtype),
               smem_tile((CHUNK, K), jnp.float32), plgpu.Barrier(num_barriers=6 + has_gates + has_seg)]
    out = scoped_kernel(body, operands, tuple(out_type), scratch, grid=(B, H, T // CHUNK),
                        grid_names=("batch", "heads", "chunks"), name="delta_output_path_grads_mosaic",
                      interpret=interpret)
    return tuple(out) + ((None, None) if not has_gates else ())


def wy_path_grads(k, v, beta, b, rel, x, hs, dv_new, dk_output, *, interpret):
    """``(dv [B,T,H,V] bf16, dbeta [B,T,Hp] float32, dk [B,T,H,K] bf16, db [B,T,Hp] float32 or None)``,
    ``beta`` and ``b`` ``[B,T,Hp]`` as in ``mosaic_forward.chunk_transform_mosaic``,
    through ``[W | U] = X [kb | vb]``, ``kb = diag(beta m e^b) K``, ``vb = diag(beta) V`` and
    ``A = strict_lower(beta_t (k_t.k_s) D[t, s])``; ``dk`` adds ``dk_output``, the output path's."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    has_gates, has_seg = b is not None, rel is not None
    dtype = jnp.bfloat16

    def body(*refs):
        (k_ref, v_ref, beta_ref, b_ref, seg_ref, x_ref, hs_ref, dv_new_ref, dk_output_ref, dv_ref, dbeta_ref,
         dk_ref, db_ref, k_s, v_s, beta_s, b_s, seg_s, x_s, h_s, dv_new_s, dk_f32_s, keys_s, values_s, pairs_s,
         bars) = named_refs(
            refs, "k v beta b seg x hs dv_new dk_output dv dbeta dk db k_s v_s beta_s b_s seg_s x_s h_s dv_new_s "
            "dk_f32_s keys_s values_s pairs_s bars", b=has_gates, seg=has_seg, db=has_gates)
        ci, hi = lax.axis_index("chunks"), lax.axis_index("heads")
        at = chunk_windows(lax.axis_index("batch"), hi)
        copies = [(at.tokens(k_ref), k_s), (at.tokens(v_ref), v_s), (at.token_rows(beta_ref), beta_s),
                  (at.tokens(x_ref), x_s), (at.state(hs_ref), h_s), (at.tokens(dv_new_ref), dv_new_s),
                  (at.tokens(dk_output_ref), dk_f32_s)]
        copies += [(at.token_rows(b_ref), b_s)] if has_gates else []
        copies += [(at.token_rows(seg_ref), seg_s)] if has_seg else []
        load_chunk(copies, ci, bars)

        row, col, token = chunk_iotas()
        beta_t, b_t, rel = rows_vector(beta_s, head=hi), rows_vector(b_s, head=hi), rows_vector(seg_s)
        from_start, _, _ = boundary_factors(b_t, rel, token)
        key_scale = beta_t if from_start is None else beta_t * from_start
        keep = pair_mask(row, col, rel, strict=True)
        mm = lambda a, b_, shape: matmul(a, b_, shape, interpret=interpret)
        kf, vf = k_s[...].astype(jnp.float32), v_s[...].astype(jnp.float32)

        # v' = X vb - X kb S
        dvb = mm(x_s.T, dv_new_s, (CHUNK, V))
        dv_s = values_s
        dbeta = jnp.sum(dvb * vf, axis=1)
        keys_s[...] = mm(dv_new_s, h_s.T, (CHUNK, K)).astype(dtype)  # dv' S^T
        plgpu.commit_smem()
        dkb = -mm(x_s.T, keys_s, (CHUNK, K))
        kb = scaled_rows(kf, key_scale)
        values_s[...] = (scaled_rows(vf, beta_t) - mm(kb.astype(dtype), h_s, (CHUNK, V))).astype(dtype)
        plgpu.commit_smem()
        dx = mm(dv_new_s, values_s.T, (CHUNK, CHUNK))  # dv' (vb - kb S)^T
        pairs_s[...] = mm(dx.astype(dtype), x_s.T, (CHUNK, CHUNK)).astype(dtype)
        plgpu.commit_smem()
        da = -mm(x_s.T, pairs_s, (CHUNK, CHUNK))  # -X^T dX X^T
        # A = strict_lower(beta_t (k_t.k_s) D[t, s])
        kk = mm(k_s, k_s.T, (CHUNK, CHUNK))
        if has_gates:
            da = da * pair_decays(b_t, row, col)
        da = jnp.where(keep, da, 0.0)  # dA * D: the decay and mask of A's pairs
        dkk = da * bcast_rows(beta_t, CHUNK)
        dbeta += jnp.sum(dkb * kf, axis=1) * (1.0 if from_start is None else from_start)
        dbeta += jnp.sum(da * kk, axis=1)
        pairs_s[...] = dkk.astype(dtype)
        dv_s[...] = scaled_rows(dvb, beta_t).astype(dtype)
        at.tokens(dbeta_ref)(ci)[...] = dbeta
        if has_gates:
            at.tokens(db_ref)(ci)[...] = jnp.sum(kb * dkb, axis=1) + _pair_gate_grads(dkk * kk, row, col)
        plgpu.commit_smem()
        dk = (mm(dkk.astype(dtype), k_s, (CHUNK, K)) + mm(pairs_s.T, k_s, (CHUNK, K))
              + scaled_rows(dkb, key_scale) + dk_f32_s[...])
        keys_s[...] = dk.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dv_s, at.tokens(dv_ref)(ci))
        plgpu.copy_smem_to_gmem(keys_s, at.tokens(dk_ref)(ci))
        plgpu.wait_smem_to_gmem(0)

    operands = [k, v, beta] + ([b] if has_gates else []) + ([rel] if has_seg else []) + [
        x, hs, dv_new, dk_output]
    per_token = jax.ShapeDtypeStruct(beta.shape, jnp.float32)
    out_type = [jax.ShapeDtypeStruct((B, T, H, V), dtype), per_token, jax.ShapeDtypeStruct((B, T, H, K), dtype)]
    out_type += [per_token] if has_gates else []
    heads = plgpu.SMEM((CHUNK, beta.shape[-1]), jnp.float32)
    scratch = [smem_tile((CHUNK, K), dtype), smem_tile((CHUNK, V), dtype), heads,
               heads if has_gates else None, plgpu.SMEM((CHUNK,), jnp.int32) if has_seg else None,
               smem_tile((CHUNK, CHUNK), dtype), smem_tile((K, V), dtype), smem_tile((CHUNK, V), dtype),
               smem_tile((CHUNK, K), jnp.float32), smem_tile((CHUNK, K), dtype), smem_tile((CHUNK, V), dtype),
               smem_tile((CHUNK, CHUNK), dtype), plgpu.Barrier(num_barriers=7 + has_gates + has_seg)]
    out = scoped_kernel(body, operands, tuple(out_type), scratch, grid=(B, H, T // CHUNK),
                        grid_names=("batch", "heads", "chunks"), name="delta_wy_path_grads_mosaic",
                      interpret=interpret)
    return tuple(out) + ((None,) if not has_gates else ())


def state_grad_pass_mosaic(q, k, neg_w, do, b, rel, dht, *, scale, interpret):
    """``(dhs [B,H,NT,K,V] bf16, dv_new [B,T,H,V] bf16, dh0 [B,H,K,V] float32)``: gradients of the
    states leaving each chunk, of the written values and of the initial state, the chunks walked
    last first by one program per (batch, head, V-block) with the state gradient ``dS`` in registers:
    ``dv' = P^T D_o + (n e^{b_last-b} k) dS`` and ``dS <- gamma dS + (m e^b q)^T D_o - W^T dv'``
    (``D_o = scale * do``, ``P = q k^T * D``). ``neg_w`` is ``-W`` (``chunk_transform_mosaic``);
    ``dht [B,H,K,V]`` float32 is the final state's."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    num_chunks = T // CHUNK
    block_v = mosaic_state_block_v(B, H, K, V)
    has_gates, has_seg = b is not None, rel is not None
    dtype = jnp.bfloat16

    def body(*refs):
        (q_ref, k_ref, neg_w_ref, do_ref, b_ref, seg_ref, dht_ref, dhs_ref, dv_new_ref, dh0_ref,
         q_s, k_s, neg_w_s, do_s, b_s, seg_s, dstate_s, qg_s, dv_new_s, f32_s, bars) = named_refs(
            refs, "q k neg_w do b seg dht dhs dv_new dh0 q_s k_s neg_w_s do_s b_s seg_s dstate_s qg_s dv_new_s "
            "f32_s bars", b=has_gates, seg=has_seg)
        bi, hi, vi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("v_blocks")
        at = chunk_windows(bi, hi, pl.ds(vi * block_v, block_v))
        sources = [(at.tokens(q_ref), q_s), (at.tokens(k_ref), k_s), (at.tokens(neg_w_ref), neg_w_s),
                   (at.values(do_ref), do_s)]
        sources += [(at.token_rows(b_ref), b_s)] if has_gates else []
        sources += [(at.token_rows(seg_ref), seg_s)] if has_seg else []
        run = chunk_pipeline(sources, bars, num_chunks, reverse=True)
        dstate = load_tile(at.whole_state(dht_ref), f32_s, bars.at[2 * len(sources)])
        dstate_s[0] = dstate.astype(dtype)
        plgpu.commit_smem()
        row, col, token = chunk_iotas()

        def step(c, slot, dstate):
            b_t, rel_t = rows_vector(b_s, slot, head=hi), rows_vector(seg_s, slot)
            from_start, to_end, carry = boundary_factors(b_t, rel_t, token)
            kd = scaled_rows(k_s[slot].astype(jnp.float32), to_end).astype(dtype)
            # P^T (unscaled) and the state gradient's term of dv': one wait (as in the forward pass)
            scores_t, dv_new = matmuls(([(k_s.at[slot], q_s.at[slot].T)], (CHUNK, CHUNK), None),
                                       ([(kd, dstate_s.at[slot])], (CHUNK, block_v), None),
                                       interpret=interpret, one_by_one=block_v > 64)
            scores_t = scale * scores_t
            if has_gates:
                scores_t = scores_t * pair_decays(-b_t, row, col)
            scores_t = jnp.where(pair_mask(col, row, rel_t), scores_t, 0.0).astype(dtype)  # P^T's pairs
            dv_new = matmul(scores_t, do_s.at[slot], (CHUNK, block_v), interpret=interpret, init=dv_new)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's stores are done
            dv_new_s[...] = dv_new.astype(dtype)
            qg_s[...] = (scale * scaled_rows(q_s[slot].astype(jnp.float32), from_start)).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dv_new_s, at.values(dv_new_ref)(c))
            plgpu.copy_smem_to_gmem(dstate_s.at[slot], at.state(dhs_ref)(c))
            decayed = dstate if carry is None else dstate * carry
            # dS <- gamma dS + (scale m e^b q)^T do + (-W)^T dv': both products into one accumulator
            (dstate,) = matmuls(([(qg_s.T, do_s.at[slot]), (neg_w_s.at[slot].T, dv_new_s)], (K, block_v), decayed),
                                interpret=interpret)
            dstate_s[1 - slot] = dstate.astype(dtype)
            plgpu.commit_smem()
            return dstate

        dstate = run(step, dstate)
        store_state(f32_s, dstate, at.whole_state(dh0_ref))

    operands = [q, k, neg_w, do] + ([b] if has_gates else []) + ([rel] if has_seg else []) + [dht]
    out_type = (jax.ShapeDtypeStruct((B, H, num_chunks, K, V), dtype),
                jax.ShapeDtypeStruct((B, T, H, V), dtype), jax.ShapeDtypeStruct((B, H, K, V), jnp.float32))
    return scoped_kernel(body, operands, out_type, pass_scratch(K, block_v, b.shape[-1] if has_gates else 0, has_seg),
                         grid=(B, H, V // block_v), grid_names=("batch", "heads", "v_blocks"),
                         name="delta_state_grad_pass_mosaic", interpret=interpret)
