"""Backward of the layers' short causal convolutions (depthwise, SiLU after) over q|k|v, writing the
gradient of the joined input projection in one pass (Pallas, Triton lowering).

The layers compute q|k|v and their other projections (GLA's g and gate, DeltaNet's beta and gates) as
one product ``y [B, T, W]``; the convolutions read its first ``C`` columns, the rest pass through. Under
XLA the backward takes three passes over ``[B, T, C]`` or more: it stores the pre-activation's
gradient, then forms the conv input's gradient, then copies it with the other pieces' gradients into
``y``'s gradient, and the last pass ran at a third of the memory bandwidth (9 ms of a GPT-2 Medium
step on an H200). Here one program per ``(batch, TB rows, CB columns of one piece)`` reads the rows of
``y`` and of the output gradient that its rows' taps reach (``K - 1`` on either side), recomputes the
pre-activation, and writes ``y``'s gradient once, with a partial sum of the conv kernel's gradient.
Pass-through pieces are copied by programs of their own.

Rows outside ``[0, T)`` read zero: the convolution starts each sequence from zero inputs (no cache). Rows
are gathered by index arrays, clipped into range and masked, which the Triton lowering and interpret
mode both support (interpret mode cannot load a slice that starts before row 0).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from .common import compiler_params

TB = 16  # rows per program
CB = 64  # columns per program


def _load(ref, rows, cols, n_rows, n_cols):
    """float32 ``[len(rows), len(cols)]`` of a 2-D ref, zero outside ``[0, n_rows) x [0, n_cols)``. Rows are
    clipped into range (a masked row still needs a valid address in interpret mode); columns are not, so
    that Triton still sees them contiguous and loads them in vectors."""
    mask = ((rows >= 0) & (rows < n_rows))[:, None] & (cols < n_cols)[None, :]
    index = (jnp.clip(rows, 0, n_rows - 1)[:, None], cols[None, :])
    return plgpu_triton.load(ref.at[index], mask=mask, other=0.0).astype(jnp.float32)


def _store(ref, rows, cols, value, n_rows, n_cols):
    """Stores ``value`` where ``rows < n_rows`` and ``cols < n_cols``. The indices stay unclamped: clamped,
    they would repeat, and interpret mode writes a masked-off index's old value back."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    plgpu_triton.store(ref.at[rows[:, None], cols[None, :]], value.astype(ref.dtype), mask=mask)


def _piece_blocks(widths):
    """Column blocks of each piece (``CB`` wide, the last one masked): ``[(first block, blocks, first
    column, width)]``, and the number of blocks in all."""
    pieces, block, col = [], 0, 0
    for width in widths:
        pieces.append((block, pl.cdiv(width, CB), col, width))
        block, col = block + pl.cdiv(width, CB), col + width
    return pieces, block


def _for_each_piece(pieces, body):
    """Runs ``body(i, c0, col, width)`` for the piece whose columns this program's block covers."""
    block = pl.program_id(2)
    for i, (first, n_blocks, col, width) in enumerate(pieces):
        run = lambda i=i, first=first, col=col, width=width: body(i, (block - first) * CB, col, width)
        pl.when((block >= first) & (block < first + n_blocks))(run)


def _same_segment(seg_ref, rows, T):
    """``same(a, b)``: whether rows ``rows + a`` and ``rows + b`` lie in one segment (as a ``[TB, 1]`` mask)."""
    if seg_ref is None:
        return lambda a, b: True
    seg = lambda o: seg_ref[jnp.clip(rows + o, 0, T - 1)]
    return lambda a, b: (seg(a) == seg(b))[:, None]


def _forward_kernel(y_ref, w_ref, seg_ref, *out_refs, pieces, T):
    K = w_ref.shape[0]
    t0 = pl.program_id(1) * TB
    r = t0 + jnp.arange(TB)
    same = _same_segment(seg_ref, r, T)

    def piece(i, c0, col, width):
        c = col + c0 + jnp.arange(CB)
        pre = 0.0
        for j in range(K):  # tap j of row t reads row t - (K-1-j)
            x = _load(y_ref, r - (K - 1 - j), c, T, col + width)
            pre += _load(w_ref, jnp.full((1,), j), c, K, col + width) * jnp.where(same(j - (K - 1), 0), x, 0.0)
        _store(out_refs[i], r, c - col, pre * jax.nn.sigmoid(pre), T, width)
    _for_each_piece(pieces, piece)


def _backward_kernel(y_ref, w_ref, seg_ref, *refs, pieces, n_conv, T):
    """y's gradient on rows ``t0 + [0, TB)`` and one block of columns; for a conv piece also the kernel
    gradient's sum over these rows."""
    *d_refs, dy_ref, dw_ref = refs
    K = w_ref.shape[0]
    t0 = pl.program_id(1) * TB
    r = t0 + jnp.arange(TB)
    same = _same_segment(seg_ref, r, T)

    def conv_piece(i, c0, col, width):
        c = col + c0 + jnp.arange(CB)
        x = {o: _load(y_ref, r + o, c, T, col + width) for o in range(1 - K, K)}
        w = [_load(w_ref, jnp.full((1,), j), c, K, col + width) for j in range(K)]
        # dpre[s]: the pre-activation's gradient on rows r + s; tap j of row t reads row t - (K-1-j).
        dpre = []
        for s in range(K):
            pre = sum(w[j] * jnp.where(same(s - (K - 1) + j, s), x[s - (K - 1) + j], 0.0) for j in range(K))
            sig = jax.nn.sigmoid(pre)
            dpre.append(_load(d_refs[i], r + s, c - col, T, width) * sig * (1.0 + pre * (1.0 - sig)))
        # Row r of y feeds row r + (K-1-j) through tap j.
        dx = sum(w[j] * jnp.where(same(K - 1 - j, 0), dpre[K - 1 - j], 0.0) for j in range(K))
        _store(dy_ref, r, c, dx, T, col + width)
        for j in range(K):
            dw = jnp.sum(dpre[0] * jnp.where(same(j - (K - 1), 0), x[j - (K - 1)], 0.0), axis=0, keepdims=True)
            _store(dw_ref, jnp.full((1,), j), c, dw, K, col + width)

    def pass_piece(i, c0, col, width):
        c = c0 + jnp.arange(CB)
        _store(dy_ref, r, col + c, _load(d_refs[i], r, c, T, width), T, col + width)

    _for_each_piece(pieces, lambda i, *a: (conv_piece if i < n_conv else pass_piece)(i, *a))


def _call(kernel, name, y, kernel_weights, segment_ids, operands, out_shape, out_specs, n_blocks, interpret):
    B, T, W = y.shape
    strip = lambda width: pl.BlockSpec((None, T, width), lambda b, t, c: (b, 0, 0))
    seg_spec = None if segment_ids is None else pl.BlockSpec((None, T), lambda b, t, c: (b, 0))
    return pl.pallas_call(
        kernel,
        grid=(B, pl.cdiv(T, TB), n_blocks),
        in_specs=[strip(W), pl.BlockSpec(kernel_weights.shape, lambda b, t, c: (0, 0)), seg_spec]
                 + [strip(x.shape[-1]) for x in operands],
        out_specs=[strip(o.shape[-1]) if spec is None else spec for o, spec in zip(out_shape, out_specs)],
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps=4, num_stages=1),
        interpret=interpret,
        name=name,
    )(y, kernel_weights.astype(jnp.float32), None if segment_ids is None else segment_ids.astype(jnp.int32),
      *operands)


def conv_forward(y, kernel, conv_widths, segment_ids=None, *, interpret=False):
    """The convolutions of ``y [B, T, W]``'s first ``C`` columns: one ``[B, T, width]`` output in y's dtype
    per width of ``conv_widths`` (summing to ``C``), each ``silu(sum_j kernel[j] * y[t - (K-1-j)])`` over
    its columns of ``kernel [K, C]``. ``segment_ids [B, T]``: taps reaching into another segment read zero."""
    B, T, _ = y.shape
    if sum(conv_widths) != kernel.shape[1]:
        raise ValueError(f"conv_forward: widths {list(conv_widths)} must sum to the kernel's {kernel.shape[1]} columns")
    pieces, n_blocks = _piece_blocks(conv_widths)
    out_shape = [jax.ShapeDtypeStruct((B, T, w), y.dtype) for w in conv_widths]
    return tuple(_call(functools.partial(_forward_kernel, pieces=pieces, T=T), "conv_forward", y, kernel,
                       segment_ids, [], out_shape, [None] * len(out_shape), n_blocks, interpret))


def conv_join_backward(y, kernel, conv_grads, pass_grads, segment_ids=None, *, interpret=False):
    """The gradients of ``y [B, T, W]`` and of ``kernel [K, C]``.

    ``y``'s first ``C`` columns feed depthwise causal convolutions with SiLU (``conv_forward``), whose
    outputs have the gradients ``conv_grads`` (``[B, T, width]`` each, widths summing to ``C``); its
    remaining columns are outputs themselves, with the gradients ``pass_grads`` in order. Returns y's
    gradient in y's dtype and the kernel's in float32.
    """
    B, T, W = y.shape
    K, C = kernel.shape
    widths = [g.shape[-1] for g in (*conv_grads, *pass_grads)]
    if sum(widths[:len(conv_grads)]) != C or sum(widths) != W:
        raise ValueError(f"conv_join_backward: gradient widths {widths} must sum to y's {W} columns, the "
                         f"convolved ones to the kernel's {C}")
    pieces, n_blocks = _piece_blocks(widths)
    num_t = pl.cdiv(T, TB)
    out_shape = [jax.ShapeDtypeStruct(y.shape, y.dtype), jax.ShapeDtypeStruct((B, num_t, K, C), jnp.float32)]
    dw_spec = pl.BlockSpec((None, None, K, C), lambda b, t, c: (b, t, 0, 0))
    dy, dw = _call(functools.partial(_backward_kernel, pieces=pieces, n_conv=len(conv_grads), T=T),
                   "conv_join_backward", y, kernel, segment_ids,
                   [g.reshape(B, T, -1) for g in (*conv_grads, *pass_grads)], out_shape, [None, dw_spec],
                   n_blocks, interpret)
    return dy, dw.sum(axis=(0, 1))
