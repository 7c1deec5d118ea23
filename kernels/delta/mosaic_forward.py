"""Delta-rule forward (plain and gated) on Mosaic GPU (Hopper: TMA, wgmma), bf16: two kernels.

The math is ``forward.py``'s (see there for ``m``, ``n``, ``gamma`` and ``D``); the Triton forward's
state pass and output kernel become one pass here.

1. ``chunk_transform_mosaic``, one program per chunk: ``A = strict_lower(beta_t (k_t.k_s) D[t, s])``,
   ``X = (I + A)^-1``, ``W = X diag(beta e^b m) K`` and ``U = X diag(beta) V``. It writes ``-W``: both
   passes subtract ``W``'s products from a sum (``v' = U - W S``, ``dS`` in the backward), and a
   product that accumulates into the sum's other terms needs no negation of its own. The inverse merges
   diagonal blocks 1 -> 2 -> ... -> 64 with ``inv([[L1, 0], [M, L2]]) = [[X1, 0], [-X2 M X1, X2]]``,
   which on the whole tile is ``X <- X - X (M X)``, ``M`` the blocks of ``A`` below the diagonal
   blocks at that width: two tensor-core products a level, one bf16 pass each. That errs about
   2e-3 relative on X, as much as X's own bf16 rounding in ``W``, ``U`` and the saved copy the
   backward reads (the Triton kernel's three-pass products err 3e-6 before that rounding).
2. ``state_outputs_mosaic``, one program per (batch, head, V-block) walking the chunks in order,
   the state ``S [K, V-block]`` a float32 wgmma accumulator: ``v' = U - W S``,
   ``o = scale ((m e^b q) S + (q k^T * D) v')``, ``S <- gamma S + (n e^{b_last - b} K)^T v'``. The
   next chunk's tiles load (TMA, double-buffered) while this one computes, and the products go to
   the tensor cores in two groups (``matmuls``): the pass is bound by the latency of its chain.

Per-token vectors (``beta``, the within-chunk gate cumsum ``b``) arrive ``[B, T, H]`` float32, in
the model's layout: TMA loads a chunk's rows of every head (``H`` a multiple of 4: rows of 16-byte
multiples) and each program reads its head's column. A ``[B, H, T]`` layout would need transposes,
which XLA folds into the neighbouring fusions as relayouts, slowly. Segments as chunk-relative indices
(``common.chunk_relative_segments``): ``m`` is ``rel == 0``, ``n`` is ``rel == rel_last`` and
``gamma`` needs ``rel_last == 0``.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..common import CHUNK
from ..mosaic import (ROWS, WGMMA, as_cols, bcast_cols, bcast_rows, chunk_pipeline, chunk_windows, load_chunk,
                      load_tile, matmul, matmuls, named_refs, same_document, scoped_kernel, smem_tile)

HEAD_DIMS = (64, 128)  # K and V: wgmma tiles (M a multiple of 64) with 128-byte swizzled rows


def pair_decays(b, row, col):
    """``[C, C]``: ``exp(min(b_t - b_s, 0))``, ``b`` a ROWS vector (no exponent is positive)."""
    return jnp.exp(jnp.minimum(bcast_rows(b, CHUNK) - bcast_cols(as_cols(b, row, col), CHUNK), 0.0))


def chunk_iotas():
    """``(row, col, token)``: the ``[C, C]`` WGMMA row and column iotas and the ``[C]`` ROWS one."""
    return (plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0, layout=WGMMA),
            plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1, layout=WGMMA),
            plgpu.broadcasted_iota(jnp.int32, (CHUNK,), 0, layout=ROWS))


def rows_vector(ref, slot=None, head=None):
    """A per-token SMEM vector (``ref.at[slot]`` when double-buffered) as ROWS, or column ``head`` of
    a ``[C, H]`` slab of every head's (a strided load); None without one."""
    if ref is None:
        return None
    ref = ref if slot is None else ref.at[slot]
    if head is None:
        return plgpu.load(ref, layout=ROWS)
    return plgpu.load(ref.at[:, head], layout=ROWS, optimized=False)


def pair_mask(row, col, rel, *, strict=False):
    """``[C, C]`` bool: token pairs ``(t, s)`` with ``s <= t`` (``s < t`` if ``strict``) in one
    document; ``pair_mask(col, row, rel)`` is its transpose."""
    keep = row > col if strict else row >= col
    return keep if rel is None else keep & same_document(rel, row, col)


def boundary_factors(b, rel, token):
    """``(from_start, to_end, carry)``: ``m e^b``, ``n e^{b_last - b}`` (ROWS) and ``gamma`` (scalar),
    each None where it is 1 (no gates, no segments). ``b``, ``rel``: ROWS vectors or None."""
    from_start = to_end = carry = None
    if b is not None:
        b_last = jnp.sum(jnp.where(token == CHUNK - 1, b, 0.0))
        from_start, to_end, carry = jnp.exp(b), jnp.exp(b_last - b), jnp.exp(b_last)
    if rel is not None:
        rel_last = jnp.max(rel)
        from_start = jnp.where(rel == 0, 1.0 if from_start is None else from_start, 0.0)
        to_end = jnp.where(rel == rel_last, 1.0 if to_end is None else to_end, 0.0)
        carry = jnp.where(rel_last == 0, 1.0 if carry is None else carry, 0.0)
    return from_start, to_end, carry


def scaled_rows(x, factor):
    """``x [C, D]`` times a per-row ROWS factor (None: 1)."""
    return x if factor is None else x * bcast_rows(factor, x.shape[1])


def _unit_lower_inverse(a, row, col, x_s, y_s, *, interpret):
    """``(I + a)^-1`` float32 for strictly lower ``a`` ``[C, C]`` (WGMMA layout float32).

    ``x_s``, ``y_s``: ``[C, C]`` bf16 SMEM scratch for the products' right operands.
    """
    # width 1: the 2x2 diagonal blocks' inverses are [[1, 0], [-a, 1]]
    below_diagonal_blocks = (row == col + 1) & ((row & 1) == 1)
    x = jnp.where(row == col, 1.0, 0.0) - jnp.where(below_diagonal_blocks, a, 0.0)
    shift = 1
    while (1 << shift) < CHUNK:
        blocks = (row >> shift) == (col >> shift) + 1
        below_diagonal_blocks = blocks & (((row >> shift) & 1) == 1)
        x_s[...] = x.astype(jnp.bfloat16)
        plgpu.commit_smem()
        y = matmul(jnp.where(below_diagonal_blocks, a, 0.0).astype(jnp.bfloat16), x_s, (CHUNK, CHUNK),
                   interpret=interpret)
        y_s[...] = y.astype(jnp.bfloat16)
        plgpu.commit_smem()
        x = x - matmul(x.astype(jnp.bfloat16), y_s, (CHUNK, CHUNK), interpret=interpret)
        shift += 1
    return x


def chunk_transform_mosaic(k, v, beta, b, rel, *, interpret):
    """``(neg_w [B,T,H,K], u [B,T,H,V], x [B,T,H,C])`` bf16: ``-W``, ``U`` and each chunk's
    ``X = (I + A)^-1``.

    ``k [B,T,H,K]``, ``v [B,T,H,V]`` bf16; ``beta``, ``b`` ``[B,T,Hp]`` float32, heads padded to a
    multiple of 4 (``b`` None for the plain rule); ``rel [B,T]`` int32 or None; T a multiple of ``CHUNK``.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    has_gates, has_seg = b is not None, rel is not None
    dtype = jnp.bfloat16

    def body(*refs):
        (k_ref, v_ref, beta_ref, b_ref, seg_ref, neg_w_ref, u_ref, x_ref,
         k_s, v_s, beta_s, b_s, seg_s, x_s, y_s, neg_w_s, u_s, bars) = named_refs(
            refs, "k v beta b seg neg_w u x k_s v_s beta_s b_s seg_s x_s y_s neg_w_s u_s bars",
            b=has_gates, seg=has_seg)
        ci, hi = lax.axis_index("chunks"), lax.axis_index("heads")
        at = chunk_windows(lax.axis_index("batch"), hi)
        copies = [(at.tokens(k_ref), k_s), (at.tokens(v_ref), v_s), (at.token_rows(beta_ref), beta_s)]
        copies += [(at.token_rows(b_ref), b_s)] if has_gates else []
        copies += [(at.token_rows(seg_ref), seg_s)] if has_seg else []
        load_chunk(copies, ci, bars)

        row, col, token = chunk_iotas()
        beta_t = rows_vector(beta_s, head=hi)
        b_t, rel_t = rows_vector(b_s, head=hi), rows_vector(seg_s)
        from_start, _, _ = boundary_factors(b_t, rel_t, token)
        neg_key_scale = -beta_t if from_start is None else -beta_t * from_start  # X (-kb) = -W
        a = matmul(k_s, k_s.T, (CHUNK, CHUNK), interpret=interpret) * bcast_rows(beta_t, CHUNK)
        keep = pair_mask(row, col, rel_t, strict=True)
        if has_gates:
            a = a * pair_decays(b_t, row, col)
        x = _unit_lower_inverse(jnp.where(keep, a, 0.0), row, col, x_s, y_s,
                                interpret=interpret).astype(dtype)
        # k k^T has been read: the scaled keys and values take the loaded ones' place
        k_s[...] = (k_s[...].astype(jnp.float32) * bcast_rows(neg_key_scale, K)).astype(dtype)
        v_s[...] = (v_s[...].astype(jnp.float32) * bcast_rows(beta_t, V)).astype(dtype)
        x_s[...] = x
        plgpu.commit_smem()
        neg_w_s[...] = matmul(x, k_s, (CHUNK, K), interpret=interpret).astype(dtype)
        u_s[...] = matmul(x, v_s, (CHUNK, V), interpret=interpret).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(neg_w_s, at.tokens(neg_w_ref)(ci))
        plgpu.copy_smem_to_gmem(u_s, at.tokens(u_ref)(ci))
        plgpu.copy_smem_to_gmem(x_s, at.tokens(x_ref)(ci))
        plgpu.wait_smem_to_gmem(0)

    operands = [k, v, beta] + ([b] if has_gates else []) + ([rel] if has_seg else [])
    out_type = (jax.ShapeDtypeStruct((B, T, H, K), dtype), jax.ShapeDtypeStruct((B, T, H, V), dtype),
                jax.ShapeDtypeStruct((B, T, H, CHUNK), dtype))
    heads = plgpu.SMEM((CHUNK, beta.shape[-1]), jnp.float32)
    scratch = [smem_tile((CHUNK, K), dtype), smem_tile((CHUNK, V), dtype), heads, heads if has_gates else None,
               plgpu.SMEM((CHUNK,), jnp.int32) if has_seg else None,
               smem_tile((CHUNK, CHUNK), dtype), smem_tile((CHUNK, CHUNK), dtype),
               smem_tile((CHUNK, K), dtype), smem_tile((CHUNK, V), dtype),
               plgpu.Barrier(num_barriers=3 + has_gates + has_seg)]
    return scoped_kernel(body, operands, out_type, scratch, grid=(B, H, T // CHUNK),
                         grid_names=("batch", "heads", "chunks"), name="delta_transform_mosaic",
                         interpret=interpret)


def pass_scratch(K, block_v, gate_heads, has_seg, *extra):
    """The SMEM of a pass over chunks (``state_outputs_mosaic``, ``mosaic_backward.state_grad_pass_mosaic``):
    double-buffered ``[C, K]`` x 3 and ``[C, block_v]`` tiles, gates (``[C, gate_heads]``, 0: none)
    and segments; the bf16 state in two slots; one ``[C, K]`` and one ``[C, block_v]`` tile; ``extra``;
    the float32 state; the barriers."""
    has_gates = gate_heads > 0
    dtype = jnp.bfloat16
    num_sources = 4 + has_gates + has_seg
    return (smem_tile((2, CHUNK, K), dtype), smem_tile((2, CHUNK, K), dtype),
            smem_tile((2, CHUNK, K), dtype), smem_tile((2, CHUNK, block_v), dtype),
            plgpu.SMEM((2, CHUNK, gate_heads), jnp.float32) if has_gates else None,
            plgpu.SMEM((2, CHUNK), jnp.int32) if has_seg else None,
            smem_tile((2, K, block_v), dtype), smem_tile((CHUNK, K), dtype),
            smem_tile((CHUNK, block_v), dtype), *extra, smem_tile((K, block_v), jnp.float32),
            plgpu.Barrier(num_barriers=2 * num_sources + 1))


def store_state(f32_s, state, window):
    """Writes a pass's float32 state (or state gradient) to ``window``, once the chunks' stores are done."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    f32_s[...] = state
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(f32_s, window)
    plgpu.wait_smem_to_gmem(0)


def mosaic_state_block_v(batch, heads, k_dim, v_dim, min_programs=128):
    """V columns per program: halved to 64 (the least with 128-byte swizzled state rows) while there
    are fewer than ``min_programs`` programs (about one per SM), and always with K = V = 128, whose
    full-width pass would need about 310 KB of SMEM (227 KB on Hopper)."""
    halve = k_dim == 128 or batch * heads < min_programs
    return 64 if v_dim == 128 and halve else v_dim


def state_outputs_mosaic(q, k, neg_w, u, b, rel, h0, *, scale, interpret):
    """``(o [B,T,H,V], hs [B,H,NT,K,V], v_new [B,T,H,V])`` bf16 and ``final [B,H,K,V]`` float32.

    ``q, k, neg_w [B,T,H,K]``, ``u [B,T,H,V]`` bf16 (``neg_w``, ``u`` from ``chunk_transform_mosaic``);
    ``b [B,T,Hp]`` float32 or None (``chunk_transform_mosaic``'s); ``rel [B,T]`` int32 or None;
    ``h0 [B,H,K,V]`` float32 or None.
    """
    B, T, H, K = q.shape
    V = u.shape[-1]
    num_chunks = T // CHUNK
    block_v = mosaic_state_block_v(B, H, K, V)
    has_gates, has_seg, has_h0 = b is not None, rel is not None, h0 is not None
    dtype = jnp.bfloat16

    def body(*refs):
        (q_ref, k_ref, neg_w_ref, u_ref, b_ref, seg_ref, h0_ref, o_ref, hs_ref, v_new_ref, final_ref,
         q_s, k_s, neg_w_s, u_s, b_s, seg_s, state_s, kd_s, v_new_s, o_s, f32_s, bars) = named_refs(
            refs, "q k neg_w u b seg h0 o hs v_new final q_s k_s neg_w_s u_s b_s seg_s state_s kd_s v_new_s o_s "
            "f32_s bars", b=has_gates, seg=has_seg, h0=has_h0)
        bi, hi, vi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("v_blocks")
        cols = pl.ds(vi * block_v, block_v)
        at = chunk_windows(bi, hi, cols)
        sources = [(at.tokens(q_ref), q_s), (at.tokens(k_ref), k_s), (at.tokens(neg_w_ref), neg_w_s),
                   (at.values(u_ref), u_s)]
        sources += [(at.token_rows(b_ref), b_s)] if has_gates else []
        sources += [(at.token_rows(seg_ref), seg_s)] if has_seg else []
        run = chunk_pipeline(sources, bars, num_chunks)
        if has_h0:
            state = load_tile(at.whole_state(h0_ref), f32_s, bars.at[2 * len(sources)])
        else:
            state = plgpu.layout_cast(jnp.zeros((K, block_v), jnp.float32), WGMMA)
        state_s[0] = state.astype(dtype)
        plgpu.commit_smem()

        row, col, token = chunk_iotas()

        def step(c, slot, state):
            b_t, rel = rows_vector(b_s, slot, head=hi), rows_vector(seg_s, slot)
            from_start, to_end, carry = boundary_factors(b_t, rel, token)
            qg = scaled_rows(q_s[slot].astype(jnp.float32), from_start).astype(dtype)
            # the products of the state loaded last step, and the scores: one wait (one each with 128
            # value columns: three such accumulators and the state would not fit in registers)
            v_new, o, scores = matmuls(
                ([(neg_w_s.at[slot], state_s.at[slot])], (CHUNK, block_v), u_s[slot].astype(jnp.float32)),
                ([(qg, state_s.at[slot])], (CHUNK, block_v), None),
                ([(q_s.at[slot], k_s.at[slot].T)], (CHUNK, CHUNK), None),
                interpret=interpret, one_by_one=block_v > 64)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's stores are done
            v_new_s[...] = v_new.astype(dtype)
            kd_s[...] = scaled_rows(k_s[slot].astype(jnp.float32), to_end).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(v_new_s, at.values(v_new_ref)(c))
            plgpu.copy_smem_to_gmem(state_s.at[slot], at.state(hs_ref)(c))

            if has_gates:
                scores = scores * pair_decays(b_t, row, col)
            scores = jnp.where(pair_mask(row, col, rel), scores, 0.0).astype(dtype)
            decayed = state if carry is None else state * carry
            o, state = matmuls(([(scores, v_new_s)], (CHUNK, block_v), o),
                               ([(kd_s.T, v_new_s)], (K, block_v), decayed), interpret=interpret)
            o_s[...] = (scale * o).astype(dtype)
            state_s[1 - slot] = state.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, at.values(o_ref)(c))
            return state

        state = run(step, state)
        store_state(f32_s, state, at.whole_state(final_ref))

    operands = [q, k, neg_w, u] + ([b] if has_gates else []) + ([rel] if has_seg else []) + (
        [h0] if has_h0 else [])
    out_type = (jax.ShapeDtypeStruct((B, T, H, V), dtype),
                jax.ShapeDtypeStruct((B, H, num_chunks, K, V), dtype),
                jax.ShapeDtypeStruct((B, T, H, V), dtype),
                jax.ShapeDtypeStruct((B, H, K, V), jnp.float32))
    scratch = pass_scratch(K, block_v, b.shape[-1] if has_gates else 0, has_seg, smem_tile((CHUNK, block_v), dtype))
    return scoped_kernel(body, operands, out_type, scratch, grid=(B, H, V // block_v),
                         grid_names=("batch", "heads", "v_blocks"), name="delta_state_outputs_mosaic",
                         interpret=interpret)
