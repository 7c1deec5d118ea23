"""Mosaic GPU building blocks (Hopper: TMA, wgmma) shared by the Mosaic kernels.

Arrays in registers carry a layout: a ``[64·m, n]`` tile is in the wgmma layout (``WGMMA``), its
row reductions in ``ROWS`` and its column reductions in ``COLS``; broadcasts go back the same way.
In interpret mode (CPU) the tensor-core product is replaced by ``jnp.dot`` on the same operands:
the interpreter of jax 0.11.2 fails on wgmma with register operands or an initialised accumulator.
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

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
