"""Building blocks shared by the chunked linear-attention kernels (GLA and the delta rules).

Layout: kernels read ``[B, T, H, D]`` arrays in place (no transposes); each program
sees one ``(batch, head)`` slice as a ``[T, D]`` ref and loads ``SUB``-row tiles of it.
States are kept transposed, ``[V, K]``, so that per-channel gate factors broadcast along
the last (lane) axis, the cheap direction in Triton.

Gates: within a chunk, ``b = cumsum(g)`` is taken relative to the chunk start, so
``b <= 0`` and every factor ``exp(b_i - b_j)`` with ``i >= j`` is at most 1. Pairs of
different sub-chunks factor through the boundary ``c`` between them
(``exp(b_i - c) * exp(c - b_j)``, both <= 1), and pairs inside one sub-chunk are formed
element-wise, so no exponential can overflow whatever the gates.

That costs many small products, so a chunk whose gates decay by at most
``MAX_WHOLE_CHUNK_DECAY`` (in log space, on every channel) takes the whole-chunk form
instead: one reference at the chunk start, ``(q e^b)(k e^{-b})^T``, where ``e^{-b}``
stays far below float32/bf16 overflow (e^88). Typical GLA gates (about -0.05 per
token) always qualify; gates like -20 per token never do.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

# The `jax.checkpoint` name of the tensors a forward kernel saves for its backward (chunk states and the
# like): jaxlin.model's "dots" remat policy keeps them, so the backward never re-runs a forward kernel.
RESIDUAL_NAME = "linear_attention_residual"


def saved_for_backward(*residuals):
    return tuple(None if r is None else checkpoint_name(r, RESIDUAL_NAME) for r in residuals)

CHUNK = 64  # tokens per chunk: the unit of the sequential state pass
SUB = 16  # tokens per sub-chunk: the unit of the intra-chunk gate references
NUM_SUB = CHUNK // SUB
MAX_WHOLE_CHUNK_DECAY = 40.0


def dot_dtype_for(*arrays):
    """Matmul operand dtype: bf16 (float32 accumulation) when every input is bf16, else float32."""
    return jnp.bfloat16 if all(a.dtype == jnp.bfloat16 for a in arrays) else jnp.float32


def matmul(a, b, dot_dtype, *, trans_a=False, trans_b=False):
    """``a @ b`` with float32 accumulation; float32 operands use full (non-tf32) precision."""
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    return plgpu_triton.dot(a.astype(dot_dtype), b.astype(dot_dtype), trans_a=trans_a, trans_b=trans_b,
                            precision=precision)


def is_power_of_two(n: int) -> bool:
    """Triton's block shapes: a tensor a kernel loads has power-of-two dims."""
    return n > 0 and n & (n - 1) == 0


def compiler_params(num_warps=4, num_stages=2):
    return plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def pad_time(x, length):
    """Zero-pad axis 1 (time) to ``length``: zero q/k/v/g tokens leave states unchanged."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def segment_index(segment_ids, batch, length, padded_length):
    """``[B, T_pad]`` int32, non-decreasing, 0 at t=0, +1 wherever the id changes.

    Turning arbitrary ids into a running count makes "same segment" an equality test
    and "last segment of a chunk" a max; padding repeats the last index.
    """
    if segment_ids is None:
        return None
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    index = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1)
    return jnp.pad(index, ((0, 0), (0, padded_length - length)), mode="edge")


def chunk_relative_segments(seg):
    """``[B, T_pad]`` int32: each token's segment index minus that of the state entering its chunk.

    0 marks tokens of the carried state's document; the index is non-decreasing, so a chunk's
    last segment is its maximum. ``seg`` is ``segment_index``'s output.
    """
    before = jnp.concatenate([seg[:, :1], seg[:, CHUNK - 1:-1:CHUNK]], axis=1)
    return seg - jnp.repeat(before, CHUNK, axis=1)


def load_f32(ref, rows):
    return ref[rows, :].astype(jnp.float32)


def tile_rows(chunk_start, sub):
    return pl.ds(chunk_start + sub * SUB, SUB)


def cumulative_gates(g_ref, chunk_start):
    """Per sub-chunk ``b`` tiles (cumsum of g from the chunk start) and the boundaries.

    Returns ``(b_tiles, boundaries)``: ``boundaries[s]`` is ``b`` just before sub-chunk
    ``s`` (``[1, K]``), and ``boundaries[NUM_SUB]`` is the chunk total.
    """
    b_tiles, boundaries = [], []
    carry = jnp.zeros((1, g_ref.shape[-1]), jnp.float32)
    for s in range(NUM_SUB):
        g = load_f32(g_ref, tile_rows(chunk_start, s))
        boundaries.append(carry)
        b = carry + jnp.cumsum(g, axis=0)
        b_tiles.append(b)
        carry = carry + jnp.sum(g, axis=0, keepdims=True)
    boundaries.append(carry)
    return b_tiles, boundaries


def chunk_total_gate(g_ref, chunk_start):
    """``(b, b_last)`` for a whole chunk: ``b`` ``[CHUNK, K]`` and its total ``[1, K]``."""
    g = load_f32(g_ref, pl.ds(chunk_start, CHUNK))
    return jnp.cumsum(g, axis=0), jnp.sum(g, axis=0, keepdims=True)


def decays_mildly(b_last):
    """Scalar bool: may this chunk use the single-reference (whole-chunk) form?"""
    return jnp.max(-b_last) <= MAX_WHOLE_CHUNK_DECAY


def causal_mask(size):
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return rows >= cols


def pair_decay(b):
    """``[S, S, K]``: ``exp(b_i - b_j)`` for i >= j inside one sub-chunk (clamped to <= 1 above)."""
    return jnp.exp(jnp.minimum(b[:, None, :] - b[None, :, :], 0.0))


def segment_bounds(seg_ref, chunk_start):
    """``[1]`` segment index of the state entering the chunk and of the chunk's last token."""
    before = seg_ref[pl.ds(jnp.maximum(chunk_start - 1, 0), 1)]
    last = seg_ref[pl.ds(chunk_start + CHUNK - 1, 1)]
    return before, last


def state_block_v(batch, heads, v_dim, min_programs=128):
    """V columns per program of a sequential state pass: V is halved (down to 32) only while there are
    fewer than `min_programs` programs, about one per SM of an H100. Each V-block re-reads the keys and
    gates, so splitting further is slower: at B,T,H,V = 8,4096,16,64 the GLA state pass takes 0.168 ms
    on 128 programs and 0.219 ms on 256."""
    block = v_dim
    while block > 32 and batch * heads * (v_dim // block) < min_programs:
        block //= 2
    return block


def sequential_state_call(kernel, key_like, value_like, gate, seg, state_in, *, block_v, dot_dtype,
                          num_warps, num_stages, interpret, name):
    """Runs a GLA-style sequential pass over chunks, one program per (batch, head, V-block).

    Inputs: ``key_like [B, T, H, K]``, ``value_like [B, T, H, V]``, ``gate [B, T, H, K]``,
    ``seg [B, T]`` or None, ``state_in [B, H, V, K]`` (transposed) or None. Outputs the per-chunk
    states ``[B, H, NT, V, K]`` in ``dot_dtype`` and the state after the pass ``[B, H, V, K]``
    float32, both transposed.
    """
    B, T, H, K = key_like.shape
    V = value_like.shape[-1]
    num_chunks = T // CHUNK
    seq_spec = pl.BlockSpec((None, T, None, K), lambda b, h, iv: (b, 0, h, 0))
    state_spec = pl.BlockSpec((None, None, block_v, K), lambda b, h, iv: (b, h, iv, 0))
    return pl.pallas_call(
        functools.partial(kernel, num_chunks=num_chunks),
        grid=(B, H, V // block_v),
        in_specs=[
            seq_spec,
            pl.BlockSpec((None, T, None, block_v), lambda b, h, iv: (b, 0, h, iv)),
            seq_spec,
            None if seg is None else pl.BlockSpec((None, T), lambda b, h, iv: (b, 0)),
            None if state_in is None else state_spec,
        ],
        out_specs=[pl.BlockSpec((None, None, num_chunks, block_v, K), lambda b, h, iv: (b, h, 0, iv, 0)),
                   state_spec],
        out_shape=[jax.ShapeDtypeStruct((B, H, num_chunks, V, K), dot_dtype),
                   jax.ShapeDtypeStruct((B, H, V, K), jnp.float32)],
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=name,
    )(key_like, value_like, gate, seg, state_in)
