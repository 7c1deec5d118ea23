"""GLA forward on Mosaic GPU (Hopper: TMA loads and stores, wgmma products), one fused pass.

One program per (batch, head) walks the chunks in order with the state in registers
(float32, transposed ``[V, K]``, a wgmma accumulator), so the state pass and the chunk outputs
of the Triton forward (``forward.py``) become one kernel and the states never round-trip
through memory except as the ``hs`` the backward reads. Per chunk, with ``b`` the within-chunk
gate cumsum (a product with a lower-triangular matrix of ones: exact on bf16 gates, float32
accumulation) and ``S`` the state entering the chunk:

- ``o = scale * (m * (q e^b) S + tril(A) v)``, ``A = (q e^b)(k e^{-b})^T`` for mildly decaying
  chunks (``common.MAX_WHOLE_CHUNK_DECAY``); other chunks form ``A v`` key by key with
  ``exp(min(b_i - b_j, 0))`` factors, exact for any gates (slow, and rare in practice);
- ``S' = n' * e^{b_last} S + v^T (n * k e^{b_last - b})``.

The next chunk's tiles load (TMA, double-buffered) while this one computes. Segments arrive as
each token's segment index relative to the state entering its chunk (``0``: same document), so
``m`` is ``rel == 0``, ``n`` is ``rel == rel_last`` and ``n'`` is ``rel_last == 0``.
Operands are bf16 (wgmma); the float32 path stays on the Triton kernels.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..common import CHUNK, MAX_WHOLE_CHUNK_DECAY
from ..mosaic import (ROWS, WGMMA, bcast_cols, bcast_rows, chunk_pipeline, chunk_windows, load_tile, matmul,
                      named_refs, pick_row, same_document, scoped_kernel, smem_tile)

def gla_forward_mosaic(q, k, v, g, rel_seg, h0_t, *, scale, interpret):
    """``(o [B,T,H,V], hs [B,H,NT,V,K] bf16, final [B,H,V,K] float32)``.

    ``q, k, g [B,T,H,K]`` and ``v [B,T,H,V]`` bf16, ``rel_seg [B,T]`` int32 or None (see
    ``kernels.common.chunk_relative_segments``), ``h0_t [B,H,V,K]`` float32 or None; T a multiple
    of ``CHUNK``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    num_chunks = T // CHUNK
    dtype = q.dtype
    has_seg, has_h0 = rel_seg is not None, h0_t is not None

    def body(*refs):
        (q_ref, k_ref, v_ref, g_ref, seg_ref, h0_ref, o_ref, hs_ref, final_ref,
         q_s, k_s, v_s, g_s, seg_s, kg_s, kd_s, state_s, o_s, f32_s, bars) = named_refs(
            refs, "q k v g seg h0 o hs final q_s k_s v_s g_s seg_s kg_s kd_s state_s o_s f32_s bars",
            seg=has_seg, h0=has_h0)
        bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
        at = chunk_windows(bi, hi)
        sources = [(at.tokens(q_ref), q_s), (at.tokens(k_ref), k_s), (at.tokens(v_ref), v_s),
                   (at.tokens(g_ref), g_s)]
        sources += [(at.token_rows(seg_ref), seg_s)] if has_seg else []
        run = chunk_pipeline(sources, bars, num_chunks)
        if has_h0:
            state = load_tile(h0_ref.at[bi, hi], f32_s, bars.at[2 * len(sources)])
        else:
            state = plgpu.layout_cast(jnp.zeros((V, K), jnp.float32), WGMMA)
        state_s[0] = state.astype(dtype)

        row_k = plgpu.broadcasted_iota(jnp.int32, (CHUNK, K), 0, layout=WGMMA)
        row_v = plgpu.broadcasted_iota(jnp.int32, (CHUNK, V), 0, layout=WGMMA)
        row_a = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0, layout=WGMMA)
        col_a = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1, layout=WGMMA)
        token = plgpu.broadcasted_iota(jnp.int32, (CHUNK,), 0, layout=ROWS)
        ones_lower = jnp.where(row_a >= col_a, 1.0, 0.0).astype(dtype)

        def step(c, slot, state):
            qf = q_s[slot].astype(jnp.float32)
            kf = k_s[slot].astype(jnp.float32)
            bf = matmul(ones_lower, g_s.at[slot], (CHUNK, K), interpret=interpret)
            b_last = pick_row(bf, row_k, CHUNK - 1)
            keep_key = carry = None
            if has_seg:
                rel = plgpu.load(seg_s.at[slot], layout=ROWS)
                rel_last = jnp.max(rel)
                keep_key = bcast_rows(rel == rel_last, K)
                carry = rel_last == 0
            qg = (qf * jnp.exp(bf)).astype(dtype)
            kd = kf * jnp.exp(bcast_cols(b_last, CHUNK) - bf)
            if has_seg:
                kd = jnp.where(keep_key, kd, 0.0)
            kd_s[...] = kd.astype(dtype)
            mild = jnp.max(-b_last) <= MAX_WHOLE_CHUNK_DECAY
            plgpu.commit_smem()

            o = matmul(qg, state_s.at[slot].T, (CHUNK, V), interpret=interpret)
            if has_seg:
                o = jnp.where(bcast_rows(rel == 0, V), o, 0.0)
                same_doc = same_document(rel, row_a, col_a)

            def whole_chunk(o):
                kg_s[...] = (kf * jnp.exp(-bf)).astype(dtype)  # overflows unless mild
                plgpu.commit_smem()
                scores = matmul(qg, kg_s.T, (CHUNK, CHUNK), interpret=interpret)
                keep = row_a >= col_a
                if has_seg:
                    keep &= same_doc
                return matmul(jnp.where(keep, scores, 0.0).astype(dtype), v_s.at[slot], (CHUNK, V),
                              interpret=interpret, init=o)

            def key_by_key(o):
                vf = v_s[slot].astype(jnp.float32)

                def add_key(j, o):
                    decay = jnp.exp(jnp.minimum(bf - bcast_cols(pick_row(bf, row_k, j), CHUNK), 0.0))
                    scores = jnp.sum(qf * decay * bcast_cols(pick_row(kf, row_k, j), CHUNK), axis=1)
                    keep = row_v >= j
                    if has_seg:
                        rel_j = jnp.sum(jnp.where(token == j, rel, 0))
                        keep &= bcast_rows(rel == rel_j, V)
                    contribution = bcast_rows(scores, V) * bcast_cols(pick_row(vf, row_v, j), CHUNK)
                    return o + jnp.where(keep, contribution, 0.0)

                return lax.fori_loop(0, CHUNK, add_key, o)

            o = lax.cond(mild, whole_chunk, key_by_key, o)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's o store is done
            o_s[...] = (scale * o).astype(o_s.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[bi, pl.ds(c * CHUNK, CHUNK), hi])
            plgpu.copy_smem_to_gmem(state_s.at[slot], hs_ref.at[bi, hi, c])

            decayed = state * bcast_cols(jnp.exp(b_last), V)
            if has_seg:
                decayed = decayed * jnp.where(carry, 1.0, 0.0)
            state = matmul(v_s.at[slot].T, kd_s, (V, K), interpret=interpret, init=decayed)
            state_s[1 - slot] = state.astype(dtype)
            return state

        state = run(step, state)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        f32_s[...] = state
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(f32_s, final_ref.at[bi, hi])
        plgpu.wait_smem_to_gmem(0)

    operands = [q, k, v, g] + ([rel_seg] if has_seg else []) + ([h0_t] if has_h0 else [])
    out_type = (jax.ShapeDtypeStruct((B, T, H, V), v.dtype),
                jax.ShapeDtypeStruct((B, H, num_chunks, V, K), dtype),
                jax.ShapeDtypeStruct((B, H, V, K), jnp.float32))
    scratch = [
        smem_tile((2, CHUNK, K), dtype), smem_tile((2, CHUNK, K), dtype),
        # v^T and the keys meet in one product with both operands in SMEM: same swizzle
        smem_tile((2, CHUNK, V), dtype, swizzle=K * 2), smem_tile((2, CHUNK, K), dtype),
        plgpu.SMEM((2, CHUNK), jnp.int32) if has_seg else None,
        smem_tile((CHUNK, K), dtype), smem_tile((CHUNK, K), dtype),
        smem_tile((2, V, K), dtype), smem_tile((CHUNK, V), v.dtype),
        smem_tile((V, K), jnp.float32),
        plgpu.Barrier(num_barriers=2 * (4 + has_seg) + 1),
    ]
    return scoped_kernel(body, operands, out_type, scratch, grid=(B, H), grid_names=("batch", "heads"),
                         name="gla_forward_mosaic", interpret=interpret)
