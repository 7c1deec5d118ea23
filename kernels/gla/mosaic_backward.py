"""GLA backward on Mosaic GPU (Hopper: TMA loads and stores, wgmma products), one fused reverse pass.

One program per (batch, head) walks the chunks from last to first with ``dS``, the gradient of the
state leaving the chunk (float32, transposed ``[V, K]``, a wgmma accumulator), in registers: the
Triton backward's two kernels (state-gradient pass, then chunk gradients) become one, and the
state gradients never go through memory. Per chunk, with ``S`` the state entering it (the
forward's ``hs[c]``), ``D = scale * do`` and ``b`` the within-chunk gate cumsum:

- ``A = tril((q e^b)(k e^{-b})^T)`` and ``dA = tril(D v^T)``; their transposes are formed as
  products of their own (cheaper than moving a tile across registers);
- ``dv = A^T D + (n * k e^{b_last - b}) dS``;
- ``dq = m * e^b (D S^T) + e^b (dA (k e^{-b}))``;
- ``dk = n * e^{b_last - b} (v dS^T) + e^{-b} (dA^T (q e^b))``;
- ``dS <- carried * e^{b_last} dS + (m * q e^b)^T D``.

The gate gradient needs no state at all: with ``G`` the running gate sum, ``q e^G`` and ``k e^{-G}``
make the loss depend on ``G_t`` through ``q_t dq_t - k_t dk_t``, and on the last ``G`` also through
the final state, so ``dg_t`` is the sum of ``q_s dq_s - k_s dk_s`` over the tokens ``s >= t`` of
t's document, plus ``sum_v(S_T dS_T)`` in the last document. The kernel keeps that suffix sum for
the chunks already done as a ``[CHUNK, K]`` tile whose rows are all equal (``later``). The
within-chunk suffix sums are a product with a 0/1 matrix, on ``q dq - k dk`` split into two bf16
parts (about 1e-5 relative error); the first row of the result is what the earlier chunks need.

Shared memory decides the speed: each program is a chain of small dependent products, so the SM
needs two programs at once to hide their latency, and two fit only under about 113 KiB each. The
float32 tiles that carry ``dS`` in and out therefore live in scopes of their own before and after
the chunk loop, and ``q dq - k dk`` reuses the tiles of ``q e^b`` and ``k e^{-b}``.

``m``, ``n`` and ``carried`` are the segment masks of the fused forward (``mosaic_forward.py``).
Only the whole-chunk form is here: the caller runs this kernel when every chunk decays mildly
(``all_chunks_mild``) and the Triton backward otherwise.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..common import CHUNK, MAX_WHOLE_CHUNK_DECAY
from ..mosaic import (ROWS, WGMMA, bcast_cols, bcast_rows, chunk_pipeline, chunk_windows, compiler_params,
                      interpret_params, matmul, named_refs, pick_row, same_document, smem_tile)

SMEM_LIMIT = 220 * 1024  # of Hopper's 227 KiB per block, with room for barriers and alignment
TWO_PER_SM = 110 * 1024  # two programs per SM fit below this (with the reduction scratch and barriers)


def _loop_scratch(K, V, dtype, has_seg):
    """The chunk loop's shared memory, in ``chunk_loop``'s argument order (barriers apart)."""
    return [
        # double-buffered q, k, g, v, do
        smem_tile((2, CHUNK, K), dtype), smem_tile((2, CHUNK, K), dtype), smem_tile((2, CHUNK, K), dtype),
        smem_tile((2, CHUNK, V), dtype),
        # do^T meets (m q e^b) in one product with both operands in SMEM: same swizzle
        smem_tile((2, CHUNK, V), dtype, swizzle=K * 2),
        smem_tile((2, V, K), dtype),  # double-buffered hs
        plgpu.SMEM((2, CHUNK), jnp.int32) if has_seg else None,
        # q e^b (then db's high part), k e^-b (then its low part), scale m q e^b; dS
        smem_tile((CHUNK, K), dtype), smem_tile((CHUNK, K), dtype), smem_tile((CHUNK, K), dtype),
        smem_tile((V, K), dtype),
        # the suffix-sum matrix meets db (K columns) with both operands in SMEM: same swizzle
        smem_tile((CHUNK, CHUNK), dtype, swizzle=K * 2),
        smem_tile((3, CHUNK, K), dtype), smem_tile((CHUNK, V), dtype),  # dq, dk, dg; dv on their way out
    ]


def smem_bytes(K, V):
    """Shared memory the chunk loop allocates for head dims ``K`` and ``V`` (bf16, with segments)."""
    return sum(math.prod(r.shape) * jnp.dtype(r.dtype).itemsize
               for r in _loop_scratch(K, V, jnp.bfloat16, has_seg=True))


def supports(K, V):
    """K = 32 only: at K = 64 (one program per SM) the fwd+bwd took 1.96 ms with this kernel against
    1.83 with the Triton backward (H200, docs/benchmarks.md)."""
    return K == 32 and V in (64, 128) and smem_bytes(K, V) <= SMEM_LIMIT


def all_chunks_mild(g):
    """Scalar bool: does every chunk of ``g [B, T, H, K]`` (T a multiple of ``CHUNK``) decay mildly?"""
    B, T, H, K = g.shape
    totals = jnp.sum(g.astype(jnp.float32).reshape(B, T // CHUNK, CHUNK, H, K), axis=2)
    return jnp.min(totals) >= -MAX_WHOLE_CHUNK_DECAY


def final_state_gate_grad(k, v, g, rel_seg, h_last, dht):
    """``[B, H, CHUNK, K]`` float32: ``sum_v(S_T dS_T)``, the final state's share of the gate gradient,
    repeated over the rows (the kernel's ``later`` tile for the last chunk).

    ``S_T`` is rebuilt from the state entering the last chunk (``h_last [B,H,V,K]``) and that chunk's
    keys, values and gates, as the forward built it.
    """
    last = lambda x: x[:, -CHUNK:].astype(jnp.float32)
    k, v, g = last(k), last(v), last(g)  # [B, CHUNK, H, .]
    b = jnp.cumsum(g, axis=1)
    to_end = jnp.exp(b[:, -1:] - b)
    carried = jnp.ones(k.shape[:1], jnp.float32)
    if rel_seg is not None:
        rel = rel_seg[:, -CHUNK:]
        to_end = to_end * (rel == rel[:, -1:])[..., None, None]
        carried = (rel[:, -1] == 0).astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    written = jnp.einsum("bthk,bthv->bhvk", k * to_end, v, precision=hp)
    final = carried[:, None, None, None] * jnp.exp(b[:, -1])[:, :, None, :] * h_last.astype(jnp.float32)
    grad = jnp.sum((final + written) * dht, axis=2)  # [B, H, K]
    return jnp.broadcast_to(grad[:, :, None, :], (*grad.shape[:2], CHUNK, grad.shape[-1]))


def gla_backward_mosaic(q, k, v, g, do, rel_seg, hs, dht, later, *, scale, interpret):
    """``(dq, dk, dv, dg, dh0_t [B,H,V,K] float32)``.

    ``q, k, g [B,T,H,K]``, ``v, do [B,T,H,V]`` bf16 with T a multiple of ``CHUNK``; ``rel_seg``
    ``[B,T]`` int32 or None (``kernels.common.chunk_relative_segments``); ``hs [B,H,NT,V,K]`` bf16,
    the states entering each chunk; ``dht [B,H,V,K]`` float32, the final state's cotangent;
    ``later [B,H,CHUNK,K]`` float32, ``final_state_gate_grad``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    num_chunks = T // CHUNK
    dtype = q.dtype
    has_seg = rel_seg is not None

    def body(*refs):
        (q_ref, k_ref, v_ref, g_ref, do_ref, seg_ref, hs_ref, dht_ref, later_ref,
         dq_ref, dk_ref, dv_ref, dg_ref, dh0_ref) = named_refs(
            refs, "q k v g do seg hs dht later dq dk dv dg dh0", seg=has_seg)
        bi, hi = lax.axis_index("batch"), lax.axis_index("heads")

        def load_initial(f32_s, later_s, bars):
            plgpu.copy_gmem_to_smem(dht_ref.at[bi, hi], f32_s, bars.at[0])
            plgpu.copy_gmem_to_smem(later_ref.at[bi, hi], later_s, bars.at[1])
            plgpu.barrier_wait(bars.at[0])
            plgpu.barrier_wait(bars.at[1])
            dstate, later = f32_s[...], later_s[...]
            plgpu.commit_smem()  # every thread has read the tiles before the loop's loads reuse the memory
            return dstate, later

        def store_final(dstate, f32_s):
            f32_s[...] = dstate
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(f32_s, dh0_ref.at[bi, hi])
            plgpu.wait_smem_to_gmem(0)

        def chunk_loop(dstate, later, q_s, k_s, g_s, v_s, do_s, h_s, seg_s, qg_s, kg_s, qm_s, dstate_s, suffix_s,
                       out_s, dv_s, bars):
            at = chunk_windows(bi, hi)
            sources = [(at.tokens(q_ref), q_s), (at.tokens(k_ref), k_s), (at.tokens(g_ref), g_s),
                       (at.tokens(v_ref), v_s), (at.tokens(do_ref), do_s), (at.state(hs_ref), h_s)]
            sources += [(at.token_rows(seg_ref), seg_s)] if has_seg else []
            run = chunk_pipeline(sources, bars, num_chunks, reverse=True)

            row_k = plgpu.broadcasted_iota(jnp.int32, (CHUNK, K), 0, layout=WGMMA)
            row_a = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0, layout=WGMMA)
            col_a = plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1, layout=WGMMA)
            ones_lower = jnp.where(row_a >= col_a, 1.0, 0.0).astype(dtype)  # cumsum
            causal = row_a >= col_a  # rows: queries, columns: keys
            causal_t = row_a <= col_a  # rows: keys, columns: queries
            if not has_seg:  # the suffix-sum matrix is the same for every chunk
                suffix_s[...] = jnp.where(causal_t, 1.0, 0.0).astype(dtype)
                plgpu.commit_smem()

            def step(c, slot, carry):
                dstate, later = carry
                qf = q_s[slot].astype(jnp.float32)
                kf = k_s[slot].astype(jnp.float32)
                bf = matmul(ones_lower, g_s.at[slot], (CHUNK, K), interpret=interpret)
                b_last = pick_row(bf, row_k, CHUNK - 1)
                from_start, to_start = jnp.exp(bf), jnp.exp(-bf)
                to_end = jnp.exp(bcast_cols(b_last, CHUNK) - bf)
                state_from_start, keep, keep_t, starts_in_doc, in_last_doc = from_start, causal, causal_t, None, None
                if has_seg:
                    rel = plgpu.load(seg_s.at[slot], layout=ROWS)
                    rel_last = jnp.max(rel)
                    carried = rel_last == 0
                    starts_in_doc = jnp.min(rel) == 0  # the first token continues the entering state's document
                    in_last_doc = bcast_rows(rel == rel_last, K)
                    state_from_start = jnp.where(bcast_rows(rel == 0, K), from_start, 0.0)
                    to_end = jnp.where(in_last_doc, to_end, 0.0)
                    same_doc = same_document(rel, row_a, col_a)
                    keep, keep_t = keep & same_doc, keep_t & same_doc
                    suffix_s[...] = jnp.where(keep_t, 1.0, 0.0).astype(dtype)
                qg = qf * from_start
                kg = kf * to_start
                kd = kf * to_end
                qg_s[...] = qg.astype(dtype)
                kg_s[...] = kg.astype(dtype)
                qm_s[...] = (scale * qf * state_from_start).astype(dtype)
                dstate_s[...] = dstate.astype(dtype)
                plgpu.commit_smem()
                do_b, v_b = do_s[slot], v_s[slot]

                # dv = A^T D + (n k e^{b_last - b}) dS
                scores_t = matmul(kg.astype(dtype), qg_s.T, (CHUNK, CHUNK), interpret=interpret)
                scores_t = jnp.where(keep_t, scale * scores_t, 0.0).astype(dtype)
                dv = matmul(kd.astype(dtype), dstate_s.T, (CHUNK, V), interpret=interpret)
                dv = matmul(scores_t, do_s.at[slot], (CHUNK, V), interpret=interpret, init=dv)

                # dq = m e^b (D S^T) + e^b (dA (k e^-b))
                dq_state = matmul(do_b, h_s.at[slot], (CHUNK, K), interpret=interpret)
                dscores = matmul(do_b, v_s.at[slot].T, (CHUNK, CHUNK), interpret=interpret)
                dscores = jnp.where(keep, scale * dscores, 0.0).astype(dtype)
                dq_pairs = matmul(dscores, kg_s, (CHUNK, K), interpret=interpret)
                dq = scale * state_from_start * dq_state + from_start * dq_pairs

                # dk = n e^{b_last - b} (v dS^T) + e^-b (dA^T (q e^b))
                dk_end = to_end * matmul(v_b, dstate_s, (CHUNK, K), interpret=interpret)
                dscores_t = matmul(v_b, do_s.at[slot].T, (CHUNK, CHUNK), interpret=interpret)
                dscores_t = jnp.where(keep_t, scale * dscores_t, 0.0).astype(dtype)
                dk = dk_end + to_start * matmul(dscores_t, qg_s, (CHUNK, K), interpret=interpret)

                # dg = suffix sums of q dq - k dk within the document, plus those of later chunks
                # (q e^b and k e^-b are spent: their tiles take db's two bf16 parts)
                db = qf * dq - kf * dk
                db_high = db.astype(dtype)
                qg_s[...] = db_high
                kg_s[...] = (db - db_high.astype(jnp.float32)).astype(dtype)
                plgpu.commit_smem()
                dg = matmul(suffix_s, qg_s, (CHUNK, K), interpret=interpret)
                dg = matmul(suffix_s, kg_s, (CHUNK, K), interpret=interpret, init=dg)
                dg = dg + (later if in_last_doc is None else jnp.where(in_last_doc, later, 0.0))
                # the earlier chunks' share: row 0 sums the tokens of the first token's document and, if
                # that is also the last, the later chunks; it is theirs if that document is the entering one
                later = plgpu.layout_cast(bcast_cols(pick_row(dg, row_k, 0), CHUNK), WGMMA)
                if has_seg:
                    later = later * jnp.where(starts_in_doc, 1.0, 0.0)

                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's stores are done
                out_s[0] = dq.astype(dtype)
                out_s[1] = dk.astype(dtype)
                out_s[2] = dg.astype(dtype)
                dv_s[...] = dv.astype(dtype)
                plgpu.commit_smem()
                rows = pl.ds(c * CHUNK, CHUNK)
                for j, out_ref in enumerate((dq_ref, dk_ref, dg_ref)):
                    plgpu.copy_smem_to_gmem(out_s.at[j], out_ref.at[bi, rows, hi])
                plgpu.copy_smem_to_gmem(dv_s, dv_ref.at[bi, rows, hi])

                # dS of the state entering this chunk (the previous chunk's leaving state)
                decayed = dstate * bcast_cols(jnp.exp(b_last), V)
                if has_seg:
                    decayed = decayed * jnp.where(carried, 1.0, 0.0)
                dstate = matmul(do_s.at[slot].T, qm_s, (V, K), interpret=interpret, init=decayed)
                return dstate, later

            dstate, _ = run(step, (dstate, later))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the memory is free for store_final
            return dstate

        dstate, later = pl.run_scoped(load_initial, smem_tile((V, K), jnp.float32),
                                      smem_tile((CHUNK, K), jnp.float32), plgpu.Barrier(num_barriers=2))
        dstate = pl.run_scoped(
            functools.partial(chunk_loop, dstate, later),
            *_loop_scratch(K, V, dtype, has_seg),
            plgpu.Barrier(num_barriers=2 * (6 + has_seg)),
        )
        pl.run_scoped(functools.partial(store_final, dstate), smem_tile((V, K), jnp.float32))

    operands = [q, k, v, g, do] + ([rel_seg] if has_seg else []) + [hs, dht, later]
    out_type = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, g)) + (
        jax.ShapeDtypeStruct((B, H, V, K), jnp.float32),)
    return plgpu.kernel(
        body, out_type=out_type, grid=(B, H), grid_names=("batch", "heads"),
        interpret=interpret_params(interpret), compiler_params=compiler_params(),
        kernel_name="gla_backward_mosaic",
    )(*operands)
