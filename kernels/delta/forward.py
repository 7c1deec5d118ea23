"""Delta-rule forward (plain and gated): per-chunk UT transform, sequential state pass, outputs.

Per chunk, with ``b = cumsum(g)`` from the chunk start (one scalar per token, <= 0), ``S``
the state entering the chunk and ``D[t, s] = exp(b_t - b_s)`` for ``s <= t`` in one segment:

1. ``chunk_transform`` (one program per chunk): ``A = strict_lower(beta_t (k_t.k_s) D[t, s])``,
   ``X = (I + A)^-1``, ``W = X diag(beta e^b m) K``, ``U = X diag(beta) V``;
2. ``state_pass`` (one program per (batch, head, V-block), chunks in order): the written values
   ``v' = U - W S``, then ``S <- gamma S + (n e^{b_last - b} K)^T v'``;
3. ``chunk_outputs`` (one program per chunk): ``o = scale ((m e^b q) S + (q k^T * D) v')``.

Segment masks as in GLA (``kernels.gla.forward``): ``m`` where the entering state reaches a
token, ``n`` where a token reaches the leaving state, ``gamma = 0`` after a reset. Gates are
scalar per token, so ``D`` is formed directly as ``exp(min(b_t - b_s, 0))``: no exponent is
positive, whatever the gates. The plain rule passes no gates (``g_ref=None``, ``b = 0``).
States are ``[K, V]`` (scalar gates need no transposed layout).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from ..common import CHUNK, causal_mask, compiler_params, load_f32, matmul, segment_bounds

BLOCK = 16  # ``unit_lower_inverse`` solves its BLOCK x BLOCK diagonal blocks element-wise


def load_gates(g_ref, rows):
    """``[C]`` float32 log gates of one chunk; zeros for the plain delta rule."""
    if g_ref is None:
        return jnp.zeros((CHUNK,), jnp.float32)
    return g_ref[rows].astype(jnp.float32)


def boundary_factors(g, seg_ref, t0):
    """``(from_start [C], to_end [C], carry [1, 1])``: ``m e^b``, ``n e^{b_last - b}`` and ``gamma``."""
    b = jnp.cumsum(g)
    b_last = jnp.sum(g, keepdims=True)
    from_start, to_end, carry = jnp.exp(b), jnp.exp(b_last - b), jnp.exp(b_last)[:, None]
    if seg_ref is not None:
        seg = seg_ref[pl.ds(t0, CHUNK)]
        before, last = segment_bounds(seg_ref, t0)
        from_start = jnp.where(seg == before, from_start, 0.0)
        to_end = jnp.where(seg == last, to_end, 0.0)
        carry = jnp.where((before == last)[:, None], carry, 0.0)
    return from_start, to_end, carry


def pair_decays(g, seg_ref, t0):
    """``[C, C]``: ``D[t, s] = exp(b_t - b_s)`` for ``s <= t`` in one segment, else 0."""
    b = jnp.cumsum(g)
    keep = causal_mask(CHUNK)
    if seg_ref is not None:
        seg = seg_ref[pl.ds(t0, CHUNK)]
        keep &= seg[:, None] == seg[None, :]
    return jnp.where(keep, jnp.exp(jnp.minimum(b[:, None] - b[None, :], 0.0)), 0.0)


def strictly_lower(x):
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.where(rows > cols, x, 0.0)


def unit_lower_inverse(a):
    """``(I + a)^-1`` for strictly lower-triangular ``a`` ``[C, C]``, float32.

    Plain forward substitution is C - 1 serial steps of [C, C] masked reductions (on an H100,
    0.9 ms of the 2.2 ms forward at B, T, H = 32, 1024, 16). Instead:

    1. the BLOCK x BLOCK diagonal blocks are inverted together, row s of every block in one
       step (BLOCK - 1 steps): ``v`` holds those rows side by side (row s of column j's block
       at column j) and ``x`` stays block-diagonal, so ``v x`` gives each block its own row;
    2. neighbouring blocks are merged, 16 -> 32 -> 64, by
       ``inv([[L1, 0], [M, L2]]) = [[X1, 0], [-X2 M X1, X2]]``: ``x <- x - x (m x)`` with ``m``
       the blocks ``M`` of ``a``, two matmuls a level.

    Both only regroup substitution (no series in powers of ``a``). The matmuls take three bf16
    passes on the tensor cores (about 3e-7 relative error): Precision.HIGHEST makes Triton fall
    back to FMA dots, 4x slower than the loop this replaces, and one tf32 pass errs 2e-5.
    """
    rows = lax.broadcasted_iota(jnp.int32, a.shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, a.shape, 1)
    same_block = rows // BLOCK == cols // BLOCK
    a_diag = jnp.where(same_block, a, 0.0)

    def step(s, x):
        v = jnp.sum(jnp.where(rows % BLOCK == s, a_diag, 0.0), axis=0)
        row_s = jnp.sum(v[:, None] * x, axis=0)[None, :]  # a[r] x, r = row s of each block (x[r] = e_r)
        return x - jnp.where((rows % BLOCK == s) & same_block, row_s, 0.0)

    x = lax.fori_loop(1, BLOCK, step, (rows == cols).astype(jnp.float32))
    mm = functools.partial(plgpu_triton.dot, precision=lax.DotAlgorithmPreset.BF16_BF16_F32_X3)
    width = BLOCK
    while width < a.shape[0]:
        pairs = (rows // width == cols // width + 1) & (rows // (2 * width) == cols // (2 * width))
        x = x - mm(x, mm(jnp.where(pairs, a, 0.0), x))
        width *= 2
    return x


def _transform_kernel(k_ref, v_ref, beta_ref, g_ref, seg_ref, w_ref, u_ref, x_ref, *, dot_dtype):
    # k_ref, w_ref [C, K]; v_ref, u_ref [C, V]; beta_ref, g_ref [C]; seg_ref [T] | None; x_ref [C, C]
    t0 = pl.program_id(2) * CHUNK
    rows = pl.ds(0, CHUNK)
    g = load_gates(g_ref, rows)
    k, beta = load_f32(k_ref, rows), beta_ref[rows].astype(jnp.float32)
    from_start, _, _ = boundary_factors(g, seg_ref, t0)
    a = strictly_lower(beta[:, None] * matmul(k, k, dot_dtype, trans_b=True) * pair_decays(g, seg_ref, t0))
    x = unit_lower_inverse(a)
    x_ref[...] = x.astype(x_ref.dtype)
    w_ref[...] = matmul(x, (beta * from_start)[:, None] * k, dot_dtype).astype(w_ref.dtype)
    u_ref[...] = matmul(x, beta[:, None] * load_f32(v_ref, rows), dot_dtype).astype(u_ref.dtype)


def _state_pass_kernel(k_ref, g_ref, seg_ref, w_ref, u_ref, h0_ref, hs_ref, v_new_ref, final_ref, *,
                       num_chunks, dot_dtype):
    # k_ref, w_ref [T, K]; u_ref, v_new_ref [T, BV]; g_ref, seg_ref [T] | None; h0, hs[c], final [K, BV]
    def step(c, state):
        t0 = pl.multiple_of(c * CHUNK, CHUNK)
        rows = pl.ds(t0, CHUNK)
        hs_ref[c] = state.astype(hs_ref.dtype)
        _, to_end, carry = boundary_factors(load_gates(g_ref, rows), seg_ref, t0)
        v_new = load_f32(u_ref, rows) - matmul(w_ref[rows, :], state, dot_dtype)
        v_new_ref[rows, :] = v_new.astype(v_new_ref.dtype)
        k_to_end = load_f32(k_ref, rows) * to_end[:, None]
        return carry * state + matmul(k_to_end, v_new, dot_dtype, trans_a=True)

    state = (jnp.zeros(final_ref.shape, jnp.float32) if h0_ref is None
             else h0_ref[...].astype(jnp.float32))
    final_ref[...] = lax.fori_loop(0, num_chunks, step, state)


def _output_kernel(q_ref, k_ref, g_ref, seg_ref, h_ref, v_new_ref, o_ref, *, scale, dot_dtype):
    # q_ref, k_ref [C, K]; g_ref [C] | None; seg_ref [T] | None; h_ref [K, V]; v_new_ref, o_ref [C, V]
    t0 = pl.program_id(2) * CHUNK
    rows = pl.ds(0, CHUNK)
    g = load_gates(g_ref, rows)
    q, k = load_f32(q_ref, rows), load_f32(k_ref, rows)
    from_start, _, _ = boundary_factors(g, seg_ref, t0)
    scores = matmul(q, k, dot_dtype, trans_b=True) * pair_decays(g, seg_ref, t0)
    out = matmul(q * from_start[:, None], h_ref[...], dot_dtype)
    out += matmul(scores, v_new_ref[...], dot_dtype)
    o_ref[...] = (scale * out).astype(o_ref.dtype)


def chunk_spec(*dims):
    """One chunk of a ``[B, T, H, *dims]`` array, on the grid ``(B, H, chunk)``."""
    return pl.BlockSpec((None, CHUNK, None, *dims), lambda b, h, c: (b, c, h) + (0,) * len(dims))


def sequence_spec(length, dim=None, block=None):
    """The whole sequence of a ``[B, T, H]`` or ``[B, T, H, dim]`` array on the grid
    ``(B, H, V-block)``; ``block`` splits ``dim`` across that grid's last axis."""
    if dim is None:
        return pl.BlockSpec((None, length, None), lambda b, h, iv: (b, 0, h))
    if block is None:
        return pl.BlockSpec((None, length, None, dim), lambda b, h, iv: (b, 0, h, 0))
    return pl.BlockSpec((None, length, None, block), lambda b, h, iv: (b, 0, h, iv))


def segment_spec(length):
    return pl.BlockSpec((None, length), lambda b, h, i: (b, 0))


def if_given(x, spec):
    return None if x is None else spec


def call(kernel, grid, in_specs, out_specs, out_shape, args, *, name, interpret):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, compiler_params=compiler_params(),
                          interpret=interpret, name=name)(*args)


def chunk_transform(k, v, beta, g, seg, *, dot_dtype, interpret):
    """``(w [B, T, H, K], u [B, T, H, V], x [B, T, H, C])`` in the matmul dtype; x is each chunk's
    ``(I + A)^-1``, kept for the backward, which only reads it as a matmul operand."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    return call(
        functools.partial(_transform_kernel, dot_dtype=dot_dtype),
        (B, H, T // CHUNK),
        [chunk_spec(K), chunk_spec(V), chunk_spec(), if_given(g, chunk_spec()),
         if_given(seg, segment_spec(T))],
        [chunk_spec(K), chunk_spec(V), chunk_spec(CHUNK)],
        [jax.ShapeDtypeStruct((B, T, H, K), dot_dtype), jax.ShapeDtypeStruct((B, T, H, V), dot_dtype),
         jax.ShapeDtypeStruct((B, T, H, CHUNK), dot_dtype)],
        (k, v, beta, g, seg), name="delta_chunk_transform", interpret=interpret)


def state_pass(k, g, seg, w, u, h0, *, dot_dtype, block_v, interpret):
    """``(hs [B, H, NT, K, V], v_new [B, T, H, V], final [B, H, K, V])``: the states entering each
    chunk and the written values (matmul dtype), and the final state (float32)."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    num_chunks = T // CHUNK
    state_spec = pl.BlockSpec((None, None, K, block_v), lambda b, h, iv: (b, h, 0, iv))
    return call(
        functools.partial(_state_pass_kernel, num_chunks=num_chunks, dot_dtype=dot_dtype),
        (B, H, V // block_v),
        [sequence_spec(T, K), if_given(g, sequence_spec(T)), if_given(seg, segment_spec(T)),
         sequence_spec(T, K), sequence_spec(T, V, block_v), if_given(h0, state_spec)],
        [pl.BlockSpec((None, None, num_chunks, K, block_v), lambda b, h, iv: (b, h, 0, 0, iv)),
         sequence_spec(T, V, block_v), state_spec],
        [jax.ShapeDtypeStruct((B, H, num_chunks, K, V), dot_dtype),
         jax.ShapeDtypeStruct((B, T, H, V), dot_dtype), jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
        (k, g, seg, w, u, h0), name="delta_state_pass", interpret=interpret)


def chunk_state_spec(K, V):
    """Chunk c's ``[K, V]`` state of a ``[B, H, NT, K, V]`` array, on the grid ``(B, H, chunk)``."""
    return pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, c, 0, 0))


def chunk_outputs(q, k, g, seg, hs, v_new, *, scale, out_dtype, dot_dtype, interpret):
    """``o [B, T, H, V]`` from the entering states ``hs`` and the written values ``v_new``."""
    B, T, H, K = q.shape
    V = v_new.shape[-1]
    return call(
        functools.partial(_output_kernel, scale=scale, dot_dtype=dot_dtype),
        (B, H, T // CHUNK),
        [chunk_spec(K), chunk_spec(K), if_given(g, chunk_spec()), if_given(seg, segment_spec(T)),
         chunk_state_spec(K, V), chunk_spec(V)],
        chunk_spec(V), jax.ShapeDtypeStruct((B, T, H, V), out_dtype),
        (q, k, g, seg, hs, v_new), name="delta_chunk_outputs", interpret=interpret)
