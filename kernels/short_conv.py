"""The layers' short causal convolutions (depthwise, SiLU after) over the q|k|v columns of their joined
input projection: the forward, and a backward that writes the projection's gradient in one pass (Pallas,
Triton lowering).

The layers compute q|k|v and their other projections (GLA's g and gate, DeltaNet's beta and gates) as
one product ``y [B, T, W]``; the convolutions read its first ``C`` columns, the rest pass through. Under
XLA the backward took three passes over ``[B, T, C]`` or more: it stored the pre-activation's gradient,
then formed the conv input's gradient, then copied it with the other pieces' gradients into ``y``'s
gradient (a join that ran at a third of the memory bandwidth: 9 ms of a GPT-2 Medium step on an H200).
Here a program takes a block of columns of one piece and walks ``Tiles.steps`` blocks of rows. For each
it reads the rows of ``y`` and of the output gradient that its taps reach (``K - 1`` on either side),
recomputes the pre-activation, and writes ``y``'s gradient once; the kernel's gradient is summed in
registers over the program's rows. Pass-through pieces are copied by programs of their own.

Rows outside ``[0, T)`` read zero: each sequence starts from zero inputs (no cache). Rows load as slices,
masked; the first block of a sequence, whose taps reach before row 0, gathers its rows by index instead
(interpret mode cannot load a slice that starts before row 0).
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
    """A program covers ``cols`` columns of one piece and ``steps`` blocks of ``rows`` rows, one after
    another (the kernel gradient's partial sums stay in registers across them), with ``warps`` warps. The
    backward takes ``passes``: 1 recomputes the pre-activation for each of the ``K`` rows that read an
    input row; 2 stores its gradient once, in y's dtype, and forms y's gradient from it in a second kernel
    (fewer loads and sigmoids, one more round trip to memory; not yet timed on a GPU). With ``walk`` a
    program walks its rows one at a time instead, keeping the last ``K - 1`` rows of the input (and of the
    pre-activation's gradient) in registers: every element is loaded and its sigmoid taken once; ``rows``
    rows are loaded per step, ahead of their arithmetic (``passes`` does not apply)."""
    rows: int
    cols: int
    steps: int
    warps: int
    passes: int = 1
    walk: bool = False


# The fastest of nine tilings timed on an H200 at GPT-2 Medium's GLA shape (docs/benchmarks.md).
FORWARD_TILES = Tiles(rows=16, cols=64, steps=8, warps=4)
BACKWARD_TILES = Tiles(rows=8, cols=128, steps=16, warps=4)


def _load(ref, start, col0, n_rows, n_cols, tiles, gather=False):
    """float32 ``[rows, cols]`` from row ``start`` and column ``col0`` of a 2-D ref, zero outside
    ``[0, n_rows) x [0, n_cols)``. A slice where ``start >= 0``; ``gather`` where it may not be (interpret
    mode cannot load a slice that starts before row 0): rows gathered by index, clipped into range."""
    r, c = start + jnp.arange(tiles.rows), col0 + jnp.arange(tiles.cols)
    mask = ((r >= 0) & (r < n_rows))[:, None] & (c < n_cols)[None, :]
    index = ((jnp.clip(r, 0, n_rows - 1)[:, None], c[None, :]) if gather
             else (pl.ds(start, tiles.rows), pl.ds(col0, tiles.cols)))
    return plgpu_triton.load(ref.at[index], mask=mask, other=0.0).astype(jnp.float32)


def _load_row(ref, j, col0, n_cols, tiles):
    """float32 ``[1, cols]``: row ``j`` of a 2-D ref from column ``col0``, zero from column ``n_cols`` on."""
    mask = (col0 + jnp.arange(tiles.cols) < n_cols)[None, :]
    return plgpu_triton.load(ref.at[pl.ds(j, 1), pl.ds(col0, tiles.cols)], mask=mask, other=0.0)


def _store(ref, start, col0, value, n_rows, n_cols):
    r, c = start + jnp.arange(value.shape[0]), col0 + jnp.arange(value.shape[1])
    mask = (r < n_rows)[:, None] & (c < n_cols)[None, :]
    plgpu_triton.store(ref.at[pl.ds(start, value.shape[0]), pl.ds(col0, value.shape[1])],
                       value.astype(ref.dtype), mask=mask)


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


def _over_row_blocks(step, carry, first, tiles):
    """``carry`` through ``step(t0, carry, gather)`` for each row block of this program, from row ``first``;
    only the first block of a sequence reads rows before row 0, so only it gathers."""
    carry = lax.cond(first == 0, lambda c: step(first, c, True), lambda c: step(first, c, False), carry)
    return lax.fori_loop(1, tiles.steps, lambda i, c: step(first + i * tiles.rows, c, False), carry)


def _same_segment(seg_ref, t0, T, tiles):
    """``same(a, b)``: whether rows ``t0 + r + a`` and ``t0 + r + b`` lie in one segment (``[rows, 1]``)."""
    if seg_ref is None:
        return lambda a, b: True
    r = t0 + jnp.arange(tiles.rows)
    seg = lambda o: seg_ref[jnp.clip(r + o, 0, T - 1)]
    return lambda a, b: (seg(a) == seg(b))[:, None]


def _kernel_rows(w_ref, col, width, tiles):
    """The conv kernel's ``K`` rows over this program's columns (``col`` on), zero from ``width`` on."""
    return [_load_row(w_ref, j, col, width, tiles) for j in range(w_ref.shape[0])]


def _taps(y_ref, K, same, t0, col, width, T, tiles, gather):
    """taps[j]: the rows of y that tap j of rows ``t0 + [0, rows)`` reads (``K-1-j`` earlier), zero where
    they lie in another segment. With ``gather`` (a sequence's first block) the taps that reach before
    ``t0`` gather their rows."""
    return [jnp.where(same(j - (K - 1), 0), _load(y_ref, t0 - (K - 1 - j), col, T, width, tiles,
                                                  gather and j < K - 1), 0.0) for j in range(K)]


def _silu_grad(pre):
    """d silu(pre) / d pre."""
    sig = jax.nn.sigmoid(pre)
    return sig * (1.0 + pre * (1.0 - sig))


def _sum_kernel_grad(step, dw_ref, col, width, first_row, tiles):
    """Runs ``step(t0, dw, gather)`` over this program's row blocks, ``dw`` the kernel gradient's ``K``
    per-element partial sums, and stores their column sums."""
    K = dw_ref.shape[0]
    zeros = tuple(jnp.zeros((tiles.rows, tiles.cols), jnp.float32) for _ in range(K))
    dw = _over_row_blocks(step, zeros, first_row, tiles)
    for j in range(K):
        _store(dw_ref, j, col, jnp.sum(dw[j], axis=0, keepdims=True), K, width)


def _copy_piece(d_ref, dy_ref, c0, col, width, first_row, T, tiles):
    """A pass-through piece's gradient, copied into y's at its columns."""
    def step(t0, carry, gather):
        _store(dy_ref, t0, col + c0, _load(d_ref, t0, c0, T, width, tiles), T, col + width)
        return carry
    _over_row_blocks(step, 0, first_row, tiles)


def _forward_kernel(y_ref, w_ref, seg_ref, *out_refs, pieces, T, tiles):
    K = w_ref.shape[0]

    def piece(i, c0, col, width, first_row):
        w = _kernel_rows(w_ref, col + c0, col + width, tiles)

        def step(t0, carry, gather):
            taps = _taps(y_ref, K, _same_segment(seg_ref, t0, T, tiles), t0, col + c0, col + width, T, tiles, gather)
            pre = sum(w[j] * taps[j] for j in range(K))
            _store(out_refs[i], t0, c0, pre * jax.nn.sigmoid(pre), T, width)
            return carry
        _over_row_blocks(step, 0, first_row, tiles)
    _for_each_piece(pieces, tiles, piece)


def _backward_kernel(y_ref, w_ref, seg_ref, *refs, pieces, n_conv, T, tiles):
    """y's gradient on this program's rows and block of columns; for a conv piece also the kernel
    gradient's sum over these rows."""
    *d_refs, dy_ref, dw_ref = refs
    K = w_ref.shape[0]

    def conv_piece(i, c0, col, width, first_row):
        w = _kernel_rows(w_ref, col + c0, col + width, tiles)

        def step(t0, dw, gather):
            same = _same_segment(seg_ref, t0, T, tiles)
            x = {o: _load(y_ref, t0 + o, col + c0, T, col + width, tiles, gather and o < 0) for o in range(1 - K, K)}
            # dpre[s]: the pre-activation's gradient on rows t0 + s + r; tap j of row t reads row t - (K-1-j).
            dpre = []
            for s in range(K):
                pre = sum(w[j] * jnp.where(same(s - (K - 1) + j, s), x[s - (K - 1) + j], 0.0) for j in range(K))
                dpre.append(_load(d_refs[i], t0 + s, c0, T, width, tiles) * _silu_grad(pre))
            # Row t0 + r of y feeds row t0 + r + (K-1-j) through tap j.
            dx = sum(w[j] * jnp.where(same(K - 1 - j, 0), dpre[K - 1 - j], 0.0) for j in range(K))
            _store(dy_ref, t0, col + c0, dx, T, col + width)
            return tuple(dw[j] + dpre[0] * jnp.where(same(j - (K - 1), 0), x[j - (K - 1)], 0.0) for j in range(K))
        _sum_kernel_grad(step, dw_ref, col + c0, col + width, first_row, tiles)

    def piece(i, c0, col, width, first_row):
        if i < n_conv:
            conv_piece(i, c0, col, width, first_row)
        else:
            _copy_piece(d_refs[i], dy_ref, c0, col, width, first_row, T, tiles)
    _for_each_piece(pieces, tiles, piece)


def _pre_gradient_kernel(y_ref, w_ref, seg_ref, *refs, pieces, T, tiles):
    """The two-pass backward's first kernel: the pre-activation's gradient of each conv piece, stored in
    y's dtype, and the kernel gradient's sum over this program's rows."""
    *d_refs, dpre_ref, dw_ref = refs
    K = w_ref.shape[0]

    def piece(i, c0, col, width, first_row):
        w = _kernel_rows(w_ref, col + c0, col + width, tiles)

        def step(t0, dw, gather):
            taps = _taps(y_ref, K, _same_segment(seg_ref, t0, T, tiles), t0, col + c0, col + width, T, tiles, gather)
            dpre = _load(d_refs[i], t0, c0, T, width, tiles) * _silu_grad(sum(w[j] * taps[j] for j in range(K)))
            _store(dpre_ref, t0, col + c0, dpre, T, col + width)
            return tuple(dw[j] + dpre * taps[j] for j in range(K))
        _sum_kernel_grad(step, dw_ref, col + c0, col + width, first_row, tiles)
    _for_each_piece(pieces, tiles, piece)


def _input_gradient_kernel(dpre_ref, w_ref, seg_ref, *refs, pieces, n_conv, T, tiles):
    """The two-pass backward's second kernel: y's gradient from the stored pre-activation gradient (rows
    after each input row only: slices, never gathers), and the pass-through pieces copied in."""
    *d_refs, dy_ref = refs
    K = w_ref.shape[0]

    def conv_piece(i, c0, col, width, first_row):
        w = _kernel_rows(w_ref, col + c0, col + width, tiles)

        def step(t0, carry, gather):
            same = _same_segment(seg_ref, t0, T, tiles)
            # Row t0 + r of y feeds row t0 + r + (K-1-j) through tap j.
            dx = sum(w[j] * jnp.where(same(K - 1 - j, 0), _load(dpre_ref, t0 + K - 1 - j, col + c0, T, col + width,
                                                                  tiles), 0.0) for j in range(K))
            _store(dy_ref, t0, col + c0, dx, T, col + width)
            return carry
        _over_row_blocks(step, 0, first_row, tiles)

    def piece(i, c0, col, width, first_row):
        if i < n_conv:
            conv_piece(i, c0, col, width, first_row)
        else:
            _copy_piece(d_refs[i - n_conv], dy_ref, c0, col, width, first_row, T, tiles)
    _for_each_piece(pieces, tiles, piece)


def _walk_row_loader(ref, col0, n_cols, T, tiles):
    """``load(t)``: float32 ``[1, cols]``, row ``t`` of a 2-D ref from column ``col0``; zero outside
    ``[0, T) x [0, n_cols)`` (the slice starts at a clipped row: interpret mode cannot start before 0)."""
    cols = col0 + jnp.arange(tiles.cols) < n_cols

    def load(t):
        mask = ((t >= 0) & (t < T)) & cols[None, :]
        return plgpu_triton.load(ref.at[pl.ds(jnp.clip(t, 0, T - 1), 1), pl.ds(col0, tiles.cols)], mask=mask,
                                 other=0.0).astype(jnp.float32)
    return load


def _walk_row_storer(ref, col0, n_cols, T, tiles):
    """``store(t, value, keep)``: writes ``[1, cols]`` at row ``t`` where ``keep`` and inside the ref."""
    cols = col0 + jnp.arange(tiles.cols) < n_cols

    def store(t, value, keep=True):
        mask = (keep & (t >= 0) & (t < T)) & cols[None, :]
        plgpu_triton.store(ref.at[pl.ds(jnp.clip(t, 0, T - 1), 1), pl.ds(col0, tiles.cols)], value.astype(ref.dtype),
                           mask=mask)
    return store


def _walk_segment(seg_ref, T):
    """``seg(t)``: row ``t``'s segment id as ``[1, 1]`` (clipped into range; constant without segments)."""
    if seg_ref is None:
        return lambda t: jnp.zeros((1, 1), jnp.int32)
    return lambda t: seg_ref[pl.ds(jnp.clip(t, 0, T - 1), 1)][:, None]


def _walk(first, n_rows, carry, load, row, tiles):
    """Walks rows ``first .. first + n_rows - 1``: per step, ``load(t)`` for ``tiles.rows`` rows, all before
    ``row(t, loaded, carry)`` runs on each in turn, so that a step's loads overlap."""
    def step(t0, carry):
        loaded = [load(t0 + r) for r in range(tiles.rows)]
        for r in range(tiles.rows):
            carry = row(t0 + r, loaded[r], carry)
        return carry
    carry = lax.fori_loop(0, n_rows // tiles.rows, lambda i, c: step(first + i * tiles.rows, c), carry)
    for r in range(n_rows % tiles.rows):  # a tail of fewer rows than a step
        t = first + n_rows - n_rows % tiles.rows + r
        carry = row(t, load(t), carry)
    return carry


def _walk_forward_kernel(y_ref, w_ref, seg_ref, *out_refs, pieces, T, tiles):
    K = w_ref.shape[0]

    def piece(i, c0, col, width, first_row):
        w = _kernel_rows(w_ref, col + c0, col + width, tiles)
        load_y, seg = _walk_row_loader(y_ref, col + c0, col + width, T, tiles), _walk_segment(seg_ref, T)
        store = _walk_row_storer(out_refs[i], c0, width, T, tiles)

        def row(t, loaded, window):
            xs, segs = window[0] + (loaded[0],), window[1] + (loaded[1],)
            pre = sum(w[j] * jnp.where(segs[j] == segs[-1], xs[j], 0.0) for j in range(K))
            store(t, pre * jax.nn.sigmoid(pre))
            return xs[1:], segs[1:]
        past = tuple(first_row - (K - 1) + j for j in range(K - 1))
        window = tuple(load_y(t) for t in past), tuple(seg(t) for t in past)
        _walk(first_row, tiles.rows * tiles.steps, window, lambda t: (load_y(t), seg(t)), row, tiles)
    _for_each_piece(pieces, tiles, piece)


def _walk_backward_kernel(y_ref, w_ref, seg_ref, *refs, pieces, n_conv, T, tiles):
    """The one-pass backward, walking rows: at row ``t`` the pre-activation's gradient of ``t`` is formed,
    and y's gradient of row ``t - (K-1)``, the last row it reaches. The walk runs ``K - 1`` rows past the
    program's own (they add to its last rows' gradient), but their kernel gradient is the next program's."""
    *d_refs, dy_ref, dw_ref = refs
    K = w_ref.shape[0]

    def conv_piece(i, c0, col, width, first_row):
        w = _kernel_rows(w_ref, col + c0, col + width, tiles)
        load_y, seg = _walk_row_loader(y_ref, col + c0, col + width, T, tiles), _walk_segment(seg_ref, T)
        load_d = _walk_row_loader(d_refs[i], c0, width, T, tiles)
        store = _walk_row_storer(dy_ref, col + c0, col + width, T, tiles)
        end = first_row + tiles.rows * tiles.steps

        def row(t, loaded, carry):
            (xs, segs, dpres), dw = carry
            x, s, d = loaded
            xs, segs = xs + (x,), segs + (s,)
            same = [segs[j] == s for j in range(K)]  # tap j of row t reads row t - (K-1-j)
            pre = sum(w[j] * jnp.where(same[j], xs[j], 0.0) for j in range(K))
            dpres = dpres + (d * _silu_grad(pre),)
            own = (t < end).astype(jnp.float32)
            dw = tuple(dw[j] + own * dpres[-1] * jnp.where(same[j], xs[j], 0.0) for j in range(K))
            # Row u = t - (K-1) of y feeds row u + (K-1-j) through tap j.
            dx = sum(w[j] * jnp.where(segs[K - 1 - j] == segs[0], dpres[K - 1 - j], 0.0) for j in range(K))
            store(t - (K - 1), dx, t - (K - 1) >= first_row)
            return (xs[1:], segs[1:], dpres[1:]), dw

        past = tuple(first_row - (K - 1) + j for j in range(K - 1))
        zeros = jnp.zeros((1, tiles.cols), jnp.float32)
        window = (tuple(load_y(t) for t in past), tuple(seg(t) for t in past), (zeros,) * (K - 1))
        _, dw = _walk(first_row, tiles.rows * tiles.steps + K - 1, (window, (zeros,) * K),
                      lambda t: (load_y(t), seg(t), load_d(t)), row, tiles)
        for j in range(K):
            _store(dw_ref, j, col + c0, dw[j], K, col + width)

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


def conv_forward(y, kernel, conv_widths, segment_ids=None, *, interpret=False, tiles=FORWARD_TILES):
    """The convolutions of ``y [B, T, W]``'s first ``C`` columns: one ``[B, T, width]`` output in y's dtype
    per width of ``conv_widths`` (summing to ``C``), each ``silu(sum_j kernel[j] * y[t - (K-1-j)])`` over
    its columns of ``kernel [K, C]``. ``segment_ids [B, T]``: taps reaching into another segment read zero."""
    B, T, _ = y.shape
    if sum(conv_widths) != kernel.shape[1]:
        raise ValueError(f"conv_forward: widths {list(conv_widths)} must sum to the kernel's {kernel.shape[1]} columns")
    pieces, n_blocks = _piece_blocks(conv_widths, tiles)
    out_shape = [jax.ShapeDtypeStruct((B, T, w), y.dtype) for w in conv_widths]
    kernel_fn = _walk_forward_kernel if tiles.walk else _forward_kernel
    return tuple(_call(functools.partial(kernel_fn, pieces=pieces), "conv_forward", y, kernel, segment_ids,
                       [], out_shape, [None] * len(out_shape), n_blocks, tiles, interpret))


def conv_join_backward(y, kernel, conv_grads, pass_grads, segment_ids=None, *, interpret=False,
                       tiles=BACKWARD_TILES):
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
    n_conv = len(conv_grads)
    dw_shape = jax.ShapeDtypeStruct((B, pl.cdiv(T, tiles.rows * tiles.steps), K, C), jnp.float32)
    dw_spec = pl.BlockSpec((None, None, K, C), lambda b, t, c: (b, t, 0, 0))
    dy_shape = jax.ShapeDtypeStruct(y.shape, y.dtype)
    if tiles.walk or tiles.passes == 1:
        kernel_fn = _walk_backward_kernel if tiles.walk else _backward_kernel
        dy, dw = _call(functools.partial(kernel_fn, pieces=pieces, n_conv=n_conv), "conv_join_backward", y,
                       kernel, segment_ids, grads, [dy_shape, dw_shape], [None, dw_spec], n_blocks, tiles, interpret)
    elif tiles.passes == 2:
        conv_pieces, n_conv_blocks = _piece_blocks(widths[:n_conv], tiles)
        dpre, dw = _call(functools.partial(_pre_gradient_kernel, pieces=conv_pieces), "conv_pre_gradient", y, kernel,
                         segment_ids, grads[:n_conv], [jax.ShapeDtypeStruct((B, T, C), y.dtype), dw_shape],
                         [None, dw_spec], n_conv_blocks, tiles, interpret)
        dy = _call(functools.partial(_input_gradient_kernel, pieces=pieces, n_conv=n_conv), "conv_join_input_gradient",
                   dpre, kernel, segment_ids, grads[n_conv:], [dy_shape], [None], n_blocks, tiles, interpret)[0]
    else:
        raise ValueError(f"conv_join_backward: Tiles.passes must be 1 or 2, got {tiles.passes}")
    return dy, dw.sum(axis=(0, 1))
