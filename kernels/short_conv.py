"""The layers' short causal convolutions (depthwise, SiLU after) over the q|k|v columns of their joined
input projection: the forward, and a backward that writes the projection's gradient in one pass (Pallas,
Triton lowering).

The layers compute q|k|v and their narrow projections (GLA's forget gate's low-rank input, DeltaNet's beta
and gate) as one product ``y [B, T, W]``; the convolutions read its first ``C`` columns, the rest pass through. Under
XLA the backward took three passes over ``[B, T, C]`` or more: it stored the pre-activation's gradient,
then formed the conv input's gradient, then copied it with the other pieces' gradients into ``y``'s
gradient (a join that ran at a third of the memory bandwidth: 9 ms of a GPT-2 Medium step on an H200).

Here a program takes a block of columns of one piece and walks its rows one at a time, keeping the last
``K - 1`` rows of the input (and, backward, of the pre-activation's gradient) in registers: every element
is loaded and its sigmoid taken once. The backward forms, at row ``t``, the pre-activation's gradient of
``t`` and y's gradient of ``t - (K - 1)`` (the last row that reads it), and sums the kernel's gradient in
registers over the program's rows. Pass-through pieces are copied by programs of their own, in blocks.

Rows outside ``[0, T)`` read zero: each sequence starts from zero inputs (no cache). A row's load and
store start at its row clipped into range, masked (interpret mode cannot start a slice before row 0).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from .common import compiler_params


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A program covers ``cols`` columns of one piece and ``rows * steps`` rows, with ``warps`` warps. Each
    step loads ``rows`` rows ahead of their arithmetic (so that the loads overlap), then walks them; a
    pass-through piece is copied in ``[rows, cols]`` blocks."""
    rows: int
    cols: int
    steps: int
    warps: int


# The fastest walk tiling, forward and backward, of the ten timed on an H200 at GPT-2 Medium's GLA shape
# (docs/benchmarks.md).
TILES = Tiles(rows=8, cols=256, steps=16, warps=4)


def _row_loader(ref, col0, n_cols, T, tiles):
    """``load(t)``: float32 ``[1, cols]``, row ``t`` of a 2-D ref from column ``col0``, zero outside
    ``[0, T) x [0, n_cols)``."""
    cols = col0 + jnp.arange(tiles.cols) < n_cols

    def load(t):
        mask = ((t >= 0) & (t < T)) & cols[None, :]
        return plgpu_triton.load(ref.at[pl.ds(jnp.clip(t, 0, T - 1), 1), pl.ds(col0, tiles.cols)], mask=mask,
                                 other=0.0).astype(jnp.float32)
    return load


def _row_storer(ref, col0, n_cols, T, tiles):
    """``store(t, value, keep)``: writes ``[1, cols]`` at row ``t``, where ``keep`` and inside the ref."""
    cols = col0 + jnp.arange(tiles.cols) < n_cols

    def store(t, value, keep=True):
        mask = (keep & (t >= 0) & (t < T)) & cols[None, :]
        plgpu_triton.store(ref.at[pl.ds(jnp.clip(t, 0, T - 1), 1), pl.ds(col0, tiles.cols)], value.astype(ref.dtype),
                           mask=mask)
    return store


def _segment_of(seg_ref, T):
    """``seg(t)``: row ``t``'s segment id as ``[1, 1]`` (a constant without segments)."""
    if seg_ref is None:
        return lambda t: jnp.zeros((1, 1), jnp.int32)
    return lambda t: seg_ref[pl.ds(jnp.clip(t, 0, T - 1), 1)][:, None]


def _kernel_rows(w_ref, col0, n_cols, tiles):
    """The conv kernel's ``K`` rows over this program's columns (``col0`` on), zero from ``n_cols`` on."""
    return [_row_loader(w_ref, col0, n_cols, w_ref.shape[0], tiles)(j) for j in range(w_ref.shape[0])]


def _piece_blocks(widths, tiles):
    """Column blocks of each piece (the last one masked): ``[(first block, blocks, first column, width)]``,
    and the number of blocks in all."""
    pieces, block, col = [], 0, 0
    for width in widths:
        pieces.append((block, pl.cdiv(width, tiles.cols), col, width))
        block, col = block + pl.cdiv(width, tiles.cols), col + width
    return pieces, block


def _for_each_piece(pieces, tiles, body):
    """Runs ``body(i, c0, col, width, first_row)`` for the piece whose columns this program's block covers.
    (Program ids are read here, outside the branches: interpret mode cannot read them inside.)"""
    block, first_row = pl.program_id(2), pl.program_id(1) * tiles.rows * tiles.steps
    for i, (first, n_blocks, col, width) in enumerate(pieces):
        def run(i=i, first=first, col=col, width=width):
            body(i, (block - first) * tiles.cols, col, width, first_row)
        pl.when((block >= first) & (block < first + n_blocks))(run)


def _walk(first, n_rows, carry, load, row, tiles):
    """Walks rows ``first .. first + n_rows - 1``: per step ``load(t)`` for ``tiles.rows`` rows, all before
    ``row(t, loaded, carry)`` runs on each in turn; a last step of fewer rows takes the rest."""
    def step(t0, n, carry):
        loaded = [load(t0 + r) for r in range(n)]
        for r in range(n):
            carry = row(t0 + r, loaded[r], carry)
        return carry
    carry = lax.fori_loop(0, n_rows // tiles.rows, lambda i, c: step(first + i * tiles.rows, tiles.rows, c), carry)
    return step(first + n_rows - n_rows % tiles.rows, n_rows % tiles.rows, carry)


def _masked_taps(xs, segs):
    """What row t's taps read: ``xs[j]`` is row ``t - (K-1-j)`` (the last, row t), zero where its segment
    (``segs[j]``) is not row t's."""
    return [jnp.where(seg == segs[-1], x, 0.0) for x, seg in zip(xs, segs)]


def _silu_grad(pre):
    """d silu(pre) / d pre."""
    sig = jax.nn.sigmoid(pre)
    return sig * (1.0 + pre * (1.0 - sig))


def _copy_piece(d_ref, dy_ref, c0, col, width, first_row, T, tiles):
    """A pass-through piece's gradient, copied into y's at its columns in ``[rows, cols]`` blocks."""
    cols = c0 + jnp.arange(tiles.cols)

    def step(i, carry):
        t0 = first_row + i * tiles.rows
        mask = (t0 + jnp.arange(tiles.rows) < T)[:, None] & (cols < width)[None, :]
        block = plgpu_triton.load(d_ref.at[pl.ds(t0, tiles.rows), pl.ds(c0, tiles.cols)], mask=mask, other=0.0)
        plgpu_triton.store(dy_ref.at[pl.ds(t0, tiles.rows), pl.ds(col + c0, tiles.cols)], block.astype(dy_ref.dtype),
                           mask=mask)
        return carry
    lax.fori_loop(0, tiles.steps, step, 0)


def _forward_kernel(y_ref, w_ref, seg_ref, *out_refs, pieces, T, tiles):
    K = w_ref.shape[0]

    def piece(i, c0, col, width, first_row):
        w = _kernel_rows(w_ref, col + c0, col + width, tiles)
        load_y, seg = _row_loader(y_ref, col + c0, col + width, T, tiles), _segment_of(seg_ref, T)
        store = _row_storer(out_refs[i], c0, width, T, tiles)

        def row(t, loaded, window):
            xs, segs = window[0] + (loaded[0],), window[1] + (loaded[1],)
            pre = sum(w[j] * tap for j, tap in enumerate(_masked_taps(xs, segs)))
            store(t, pre * jax.nn.sigmoid(pre))
            return xs[1:], segs[1:]
        past = tuple(first_row - (K - 1) + j for j in range(K - 1))
        window = tuple(load_y(t) for t in past), tuple(seg(t) for t in past)
        _walk(first_row, tiles.rows * tiles.steps, window, lambda t: (load_y(t), seg(t)), row, tiles)
    _for_each_piece(pieces, tiles, piece)


def _backward_kernel(y_ref, w_ref, seg_ref, *refs, pieces, n_conv, T, tiles):
    """y's gradient on this program's rows and block of columns; for a conv piece also the kernel
    gradient's sum over these rows. The walk runs ``K - 1`` rows past the program's own: their
    pre-activation gradients reach its last rows, but their kernel gradient is the next program's."""
    *d_refs, dy_ref, dw_ref = refs
    K = w_ref.shape[0]

    def conv_piece(i, c0, col, width, first_row):
        w = _kernel_rows(w_ref, col + c0, col + width, tiles)
        load_y, seg = _row_loader(y_ref, col + c0, col + width, T, tiles), _segment_of(seg_ref, T)
        load_d = _row_loader(d_refs[i], c0, width, T, tiles)
        store = _row_storer(dy_ref, col + c0, col + width, T, tiles)
        end = first_row + tiles.rows * tiles.steps

        def row(t, loaded, carry):
            (xs, segs, dpres), dw = carry
            x, s, d = loaded
            xs, segs = xs + (x,), segs + (s,)
            taps = _masked_taps(xs, segs)
            dpres = dpres + (d * _silu_grad(sum(w[j] * taps[j] for j in range(K))),)
            own = (t < end).astype(jnp.float32)
            dw = tuple(dw[j] + own * dpres[-1] * taps[j] for j in range(K))
            # Row u = t - (K-1) of y feeds row u + (K-1-j) through tap j.
            dx = sum(w[j] * jnp.where(segs[K - 1 - j] == segs[0], dpres[K - 1 - j], 0.0) for j in range(K))
            store(t - (K - 1), dx, t - (K - 1) >= first_row)
            return (xs[1:], segs[1:], dpres[1:]), dw

        past = tuple(first_row - (K - 1) + j for j in range(K - 1))
        zeros = jnp.zeros((1, tiles.cols), jnp.float32)
        window = (tuple(load_y(t) for t in past), tuple(seg(t) for t in past), (zeros,) * (K - 1))
        _, dw = _walk(first_row, tiles.rows * tiles.steps + K - 1, (window, (zeros,) * K),
                      lambda t: (load_y(t), seg(t), load_d(t)), row, tiles)
        store_dw = _row_storer(dw_ref, col + c0, col + width, K, tiles)
        for j in range(K):
            store_dw(j, dw[j])

    def piece(i, c0, col, width, first_row):
        if i < n_conv:
            conv_piece(i, c0, col, width, first_row)
        else:
            _copy_piece(d_refs[i], dy_ref, c0, col, width, first_row, T, tiles)
    _for_each_piece(pieces, tiles, piece)


def _call(kernel, name, y, kernel_weights, segment_ids, operands, out_shape, out_specs, n_blocks, tiles,
          interpret):
    B, T, W = y.shape
    strip = lambda width: pl.BlockSpec((None, T, width), lambda b, t, c: (b, 0, 0))
    seg_spec = None if segment_ids is None else pl.BlockSpec((None, T), lambda b, t, c: (b, 0))
    return pl.pallas_call(
        functools.partial(kernel, T=T, tiles=tiles),
        grid=(B, pl.cdiv(T, tiles.rows * tiles.steps), n_blocks),
        in_specs=[strip(W), pl.BlockSpec(kernel_weights.shape, lambda b, t, c: (0, 0)), seg_spec]
                 + [strip(x.shape[-1]) for x in operands],
        out_specs=[strip(o.shape[-1]) if spec is None else spec for o, spec in zip(out_shape, out_specs)],
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps=tiles.warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(y, kernel_weights.astype(jnp.float32), None if segment_ids is None else segment_ids.astype(jnp.int32),
      *operands)


def conv_forward(y, kernel, conv_widths, segment_ids=None, *, interpret=False, tiles=TILES):
    """The convolutions of ``y [B, T, W]``'s first ``C`` columns: one ``[B, T, width]`` output in y's dtype
    per width of ``conv_widths`` (summing to ``C``), each ``silu(sum_j kernel[j] * y[t - (K-1-j)])`` over
    its columns of ``kernel [K, C]``. ``segment_ids [B, T]``: taps reaching into another segment read zero."""
    B, T, _ = y.shape
    if sum(conv_widths) != kernel.shape[1]:
        raise ValueError(f"conv_forward: widths {list(conv_widths)} must sum to the kernel's {kernel.shape[1]} columns")
    pieces, n_blocks = _piece_blocks(conv_widths, tiles)
    out_shape = [jax.ShapeDtypeStruct((B, T, w), y.dtype) for w in conv_widths]
    return tuple(_call(functools.partial(_forward_kernel, pieces=pieces), "conv_forward", y, kernel, segment_ids,
                       [], out_shape, [None] * len(out_shape), n_blocks, tiles, interpret))


def conv_join_backward(y, kernel, conv_grads, pass_grads, segment_ids=None, *, interpret=False, tiles=TILES):
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
    pieces, n_blocks = _piece_blocks(widths, tiles)
    grads = [g.reshape(B, T, -1) for g in (*conv_grads, *pass_grads)]
    dw_shape = jax.ShapeDtypeStruct((B, pl.cdiv(T, tiles.rows * tiles.steps), K, C), jnp.float32)
    dw_spec = pl.BlockSpec((None, None, K, C), lambda b, t, c: (b, t, 0, 0))
    dy, dw = _call(functools.partial(_backward_kernel, pieces=pieces, n_conv=len(conv_grads)), "conv_join_backward",
                   y, kernel, segment_ids, grads, [jax.ShapeDtypeStruct(y.shape, y.dtype), dw_shape],
                   [None, dw_spec], n_blocks, tiles, interpret)
    return dy, dw.sum(axis=(0, 1))
