"""Mosaic GPU building blocks (Hopper: TMA, wgmma) shared by the Mosaic kernels.

Arrays in registers carry a layout: a ``[64·m, n]`` tile is in the wgmma layout (``WGMMA``), its
row reductions in ``ROWS`` and its column reductions in ``COLS``; broadcasts go back the same way.
In interpret mode (CPU) the tensor-core product is replaced by ``jnp.dot`` on the same operands:
the interpreter of jax 0.11.2 fails on wgmma with register operands or an initialised accumulator.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .common import CHUNK

WGMMA = plgpu.Layout.WGMMA
ROWS = WGMMA.reduce(1)  # a [M] vector indexed by the rows of a WGMMA tile
COLS = WGMMA.reduce(0)  # a [N] vector indexed by its columns (reductions over rows give these)


def compiler_params():
    # Lane semantics: layouts follow the operations (Warpgroup semantics' layout search gives up on
    # kernels of this size).
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def interpret_params(interpret):
    return plgpu.InterpretGPUParams() if interpret else False


def smem_tile(shape, dtype, swizzle=128):
    """An SMEM tile laid out for TMA and wgmma: rows swizzled over ``swizzle`` bytes at most.

    wgmma needs both operands' swizzles equal when both are in SMEM.
    """
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(swizzle, shape[-1] * itemsize)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


def bcast_rows(vec, cols):
    """``[M]`` (ROWS) -> ``[M, cols]``."""
    return lax.broadcast_in_dim(vec, (vec.shape[0], cols), [0])


def bcast_cols(vec, rows):
    """``[N]`` (COLS) -> ``[rows, N]``."""
    return lax.broadcast_in_dim(vec, (rows, vec.shape[0]), [1])


def pick_row(x, row_iota, j):
    """Row ``j`` of a WGMMA tile as a COLS vector."""
    return jnp.sum(jnp.where(row_iota == j, x, 0), axis=0)


def as_cols(vec, row_iota, col_iota):
    """A per-token ``[M]`` ROWS vector as a COLS vector: the diagonal of its row broadcast (a COLS
    load does not lower). ``row_iota``, ``col_iota``: ``[M, M]`` WGMMA iotas."""
    return jnp.sum(jnp.where(row_iota == col_iota, bcast_rows(vec, vec.shape[0]), 0), axis=0)


def same_document(rel, row_iota, col_iota):
    """``[M, M]`` bool: do tokens ``i`` (rows) and ``j`` (columns) share a document? ``rel`` [M] (ROWS)."""
    by_col = as_cols(rel, row_iota, col_iota)
    return bcast_rows(rel, rel.shape[0]) == bcast_cols(by_col, rel.shape[0])


def matmul(a, b, shape, *, interpret, init=None):
    """``init + a @ b`` in float32: ``a`` in registers or SMEM, ``b`` in SMEM (refs may be ``.T``)."""
    if interpret:
        a_value = a if hasattr(a, "dtype") and not hasattr(a, "at") else a[...]
        product = jnp.dot(a_value, b[...], preferred_element_type=jnp.float32)
        return product if init is None else init + product

    def run(acc):
        plgpu.wgmma(acc, a, b)

    if init is None:
        def value(acc):
            run(acc)
            return acc[...]
        return pl.run_scoped(value, plgpu.ACC(shape, jnp.float32))
    return pl.run_state(run)(plgpu.ACC.init(init))


def matmuls(*sums, interpret, one_by_one=False):
    """Independent float32 results, each ``init + sum(a @ b for a, b in terms)`` for one
    ``(terms, shape, init)`` of ``sums`` (``init`` None: 0), operands as in ``matmul``.

    All products go to the tensor cores at once and are waited for once: one product after another,
    each waited for, leaves a chunk loop's latency-bound steps idle between small products. Each sum
    holds an accumulator in registers until the wait; ``one_by_one`` waits for each sum in turn, for
    accumulators that would not fit in registers together.
    """
    if interpret:
        return tuple(functools.reduce(lambda acc, ab: matmul(*ab, shape, interpret=True, init=acc), terms, init)
                     for terms, shape, init in sums)
    if one_by_one:
        return tuple(matmuls(s, interpret=False)[0] for s in sums)

    def run(accs):
        for acc, (terms, _, _) in zip(accs, sums):
            for a, b in terms:
                plgpu.wgmma(acc, a, b)

    inits = [plgpu.layout_cast(jnp.zeros(shape, jnp.float32), WGMMA) if init is None else init
             for _, shape, init in sums]
    return tuple(pl.run_state(run)(tuple(plgpu.ACC.init(x) for x in inits)))


def named_refs(refs, names: str, **present: bool) -> tuple:
    """A kernel's ``refs`` in the order of ``names`` (space-separated: operands, outputs, scratch). A name
    given as ``name=False`` was not passed (an optional operand or output the call lacks) and reads None."""
    names = names.split()
    unknown = set(present) - set(names)
    if unknown:
        raise ValueError(f"named_refs: {sorted(unknown)} are not among {names}")
    passed = [name for name in names if present.get(name, True)]
    if len(passed) != len(refs):
        raise ValueError(f"named_refs: {len(refs)} refs for the {len(passed)} names {passed}")
    by_name = dict(zip(passed, refs))
    return tuple(by_name.get(name) for name in names)


def scoped_kernel(body, operands, out_type, scratch, *, grid, grid_names, name, interpret):
    """``plgpu.kernel`` over ``grid`` whose ``body(*operand_refs, *output_refs, *scratch_refs)`` runs
    with the SMEM ``scratch`` allocated (``None`` entries arrive as None)."""
    return plgpu.kernel(
        lambda *refs: pl.run_scoped(lambda *s: body(*refs, *s), *scratch),
        out_type=out_type, grid=grid, grid_names=grid_names, interpret=interpret_params(interpret),
        compiler_params=compiler_params(), kernel_name=name,
    )(*operands)


def chunk_pipeline(sources, bars, num_chunks, *, reverse=False):
    """A pass over chunks (in order, or last first) with their tiles loaded by TMA while the previous
    chunk computes. ``sources``: ``(window, buffer)`` pairs; chunk ``c``'s ``window(c)`` (a GMEM ref)
    lands in ``buffer.at[slot]`` (double-buffered SMEM), ``slot`` alternating; ``bars`` holds
    ``2 * len(sources)`` barriers.

    The first chunk's loads are issued now, so that the caller's set-up (an initial state's load)
    overlaps them; the returned ``run(step, carry)`` is the ``fori_loop``, ``step(c, slot, carry) -> carry``.
    """
    def fetch(c, slot):
        for i, (window, buffer) in enumerate(sources):
            plgpu.copy_gmem_to_smem(window(c), buffer.at[slot], bars.at[2 * i + slot])

    chunk = (lambda i: num_chunks - 1 - i) if reverse else (lambda i: i)
    fetch(chunk(0), 0)

    def run(step, carry):
        def body(i, carry):
            slot = lax.rem(i, 2)
            for j in range(len(sources)):
                plgpu.barrier_wait(bars.at[2 * j + slot])

            @pl.when(i + 1 < num_chunks)
            def _():
                fetch(chunk(i + 1), 1 - slot)

            return step(chunk(i), slot, carry)

        return lax.fori_loop(0, num_chunks, body, carry)

    return run


class chunk_windows:
    """Chunk ``c``'s windows (``at.tokens(ref)(c)``, GMEM refs for TMA) of one (batch, head) in
    ``[B, T, H, D]`` arrays (``values``: columns ``cols`` of D only; ``tokens`` of a ``[B, T, H]``
    array is one head's strided column, for plain loads and stores), the rows of ``[B, T, ...]``
    arrays (``token_rows``: segments ``[B, T]``, or per-token vectors ``[B, T, H]`` with every head,
    as TMA cannot move one head's 4-byte column) and ``[B, H, NT, K, V]`` (``state``: columns ``cols``
    of V); and the ``[K, V]`` block of a ``[B, H, K, V]`` state (``whole_state``)."""

    def __init__(self, bi, hi, cols=slice(None)):
        self.bi, self.hi, self.cols = bi, hi, cols

    def _rows(self, c):
        return pl.ds(c * CHUNK, CHUNK)

    def tokens(self, ref):
        return lambda c: ref.at[self.bi, self._rows(c), self.hi]

    def values(self, ref):
        return lambda c: ref.at[self.bi, self._rows(c), self.hi, self.cols]

    def token_rows(self, ref):
        return lambda c: ref.at[self.bi, self._rows(c)]

    def state(self, ref):
        return lambda c: ref.at[self.bi, self.hi, c, :, self.cols]

    def whole_state(self, ref):
        return ref.at[self.bi, self.hi, :, self.cols]


def load_tile(window, buffer, bar):
    """TMA-loads the GMEM ref ``window`` into the SMEM ``buffer``, waits on ``bar`` and returns the tile
    in registers (a pass's initial state or state gradient)."""
    plgpu.copy_gmem_to_smem(window, buffer, bar)
    plgpu.barrier_wait(bar)
    return buffer[...]


def load_chunk(copies, c, bars):
    """TMA-loads chunk ``c`` of each ``(window, buffer)`` pair and waits for all; ``len(copies)`` barriers."""
    for i, (window, buffer) in enumerate(copies):
        plgpu.copy_gmem_to_smem(window(c), buffer, bars.at[i])
    for i in range(len(copies)):
        plgpu.barrier_wait(bars.at[i])
