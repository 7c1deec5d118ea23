"""The MLP's GELU fused into its matrix products (Mosaic GPU, Hopper), differentiable via custom_vjp.

Under XLA, GELU is a pass of its own over the ``[tokens, 4 d]`` hidden activations in each direction:
the forward reads the ``c_fc`` product ``h`` and writes ``gelu(h)``; the backward reads ``h`` and the
gradient of ``gelu(h)`` and writes ``dh``. Here the ``c_fc`` product writes ``h`` and ``gelu(h)`` from
its accumulator, and the backward product ``dy @ w_proj^T`` multiplies its accumulator by ``gelu'(h)``
before it writes: both passes, and the write and read of the gradient between them, disappear.

The products are persistent and warp-specialized: one memory warpgroup streams ``[tile, 64]`` slices
of both operands by TMA through a ring of SMEM stages, two compute warpgroups each run wgmma into a
``[128, 128]`` float32 accumulator, then apply the epilogue and store by TMA while the memory
warpgroup is already loading the next output tile's operands. The tensor cores wait while both compute
warpgroups run the epilogue; a ping-pong schedule (each warpgroup on tiles of its own, taking turns) was
tried and timed slower on an H200 (0.70 vs 0.57 ms, docs/benchmarks.md). Most of the epilogue's cost
is its stores: every program reaches its epilogue at once and their stores queue for the memory
bandwidth. Staging a whole tile of each output in SMEM, so that the stores drain behind the next
tile's products, leaves room for two ring stages only, and that was slower still (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .mosaic import interpret_params

# `jax.checkpoint` name of the residuals (h and gelu(h)): a remat policy saves them by this name, or the
# backward pass re-runs the forward product to get them back.
RESIDUAL_NAME = "gelu_matmul_residual"
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
COMPUTE_WARPGROUPS = 2
# Registers per thread: a memory warpgroup gives up all but 40, the compute warpgroups share the rest.
MEMORY_REGISTERS = 40


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One compute warpgroup's ``m x n`` output tile (the two warpgroups' tiles lie side by side along n
    and share each loaded slice of the left operand), the depth ``k`` of each loaded slice, the SMEM ring's
    ``stages``, the ``(rows, cols)`` of the sub-tiles in which the ``epilogue`` stores, the forward
    epilogue's SMEM ``slots`` (each a sub-tile of h and one of gelu(h); a slot is written again once its
    stores have read it) and the width of the snake in which output tiles are visited (neighbours share
    operand slices in L2). One program per SM.

    Each step waits for its products before its SMEM slot is released: releasing it a step later gave no
    speed and, by the pipeline's source, is unsafe in a persistent loop."""
    m: int = 128
    n: int = 128
    k: int = 64
    stages: int = 3
    epilogue: tuple[int, int] = (64, 64)
    slots: int = 2
    snake_width: int = 8

    @property
    def program_tile(self):
        """One program's ``(rows, cols)`` of the output: both compute warpgroups' tiles."""
        return self.m, COMPUTE_WARPGROUPS * self.n

    def divides(self, m, k, n):
        cta_m, cta_n = self.program_tile
        return m % cta_m == 0 and n % cta_n == 0 and k % self.k == 0

    def check(self, m, k, n):
        if not self.divides(m, k, n):
            cta_m, cta_n = self.program_tile
            raise ValueError(f"gelu_matmul: a [{m}, {k}] x [{k}, {n}] product needs m a multiple of {cta_m}, "
                             f"n of {cta_n} and k of {self.k} (see supports())")


# The fastest, for both products, of the tilings `python -m jaxlin.bench.gelu --tiles ...` timed on an H200
# (deeper rings, narrower epilogue sub-tiles, other tile shapes: docs/benchmarks.md).
TILES = Tiles()


def supports(x, w_fc) -> bool:
    """bf16 operands whose shapes the tiles divide: both products are ``[tokens, d] x [d, 4 d]``."""
    m, (d, n) = math.prod(x.shape[:-1]), w_fc.shape
    return x.dtype == w_fc.dtype == jnp.bfloat16 and TILES.divides(m, d, n)


def gelu(h):
    """GELU's tanh form (``jax.nn.gelu(approximate=True)``) of float32 ``h``."""
    return 0.5 * h * (1.0 + jnp.tanh(SQRT_2_OVER_PI * (h + GELU_CUBIC * h * h * h)))


def gelu_derivative(h):
    t = jnp.tanh(SQRT_2_OVER_PI * (h + GELU_CUBIC * h * h * h))
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * h * h)


def _swizzled(shape, dtype):
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(shape[-1] * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


class _Tile(NamedTuple):
    """A compute warpgroup's output tile: its ``rows`` and ``cols`` and the warpgroup ``wg``."""
    rows: pl.Slice
    cols: pl.Slice
    wg: jax.Array

    def sub(self, ref, offset, shape):
        """The sub-tile of this tile of the GMEM ``ref`` at ``offset`` (rows, cols) of ``shape``."""
        return ref.at[self.rows, self.cols].at[pl.ds(offset[0], shape[0]), pl.ds(offset[1], shape[1])]


def _product_kernel(a_gmem, b_gmem, *refs, tiles: Tiles, epilogue, prologue=None):
    """Loops over the program tiles (``tiles.program_tile``) of ``a @ b``. Per tile, each compute warpgroup
    calls ``prologue(tile, *refs, *scratch)`` before its products and ``epilogue(acc, tile, *refs,
    *scratch)`` after, ``acc`` its float32 accumulator of the output's ``tile`` (a ``_Tile``). Returns
    the SMEM ring's allocations and the body that takes them and ``scratch``."""
    m, k = a_gmem.shape
    n = b_gmem.shape[1]
    cta_m, cta_n = tiles.program_tile
    m_tiles, n_tiles = m // cta_m, n // cta_n

    def pipeline(body, context):
        ring = dict(memory_space=plgpu.SMEM, transforms=_swizzled((cta_m, tiles.k), a_gmem.dtype))
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k // tiles.k,), memory_registers=MEMORY_REGISTERS, wg_axis="wg",
            num_compute_wgs=COMPUTE_WARPGROUPS,
            max_concurrent_steps=tiles.stages, compute_context=context,
            in_specs=[plgpu.BlockSpec((cta_m, tiles.k), lambda i: (0, i), **ring),
                      plgpu.BlockSpec((tiles.k, cta_n), lambda i: (i, 0), **ring)])

    no_op = lambda *_, **__: None  # allocations do not depend on the body
    ring_allocs = pipeline(no_op, no_op).get_allocations(a_gmem, b_gmem)

    def scoped(ring, *scratch):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _(loop):
            mi, ni = plgpu.planar_snake(loop.index[0], (m_tiles, n_tiles), 1, tiles.snake_width)
            rows = pl.ds(mi * cta_m, tiles.m)
            cols = pl.ds(ni * cta_n + wg * tiles.n, tiles.n)
            tile = _Tile(rows, cols, wg)

            def context(run):
                if prologue is not None:
                    prologue(tile, *refs, *scratch)

                def with_acc(acc_ref):
                    run(acc_ref)
                    epilogue(acc_ref[...], tile, *refs, *scratch)
                pl.run_scoped(with_acc, plgpu.ACC((tiles.m, tiles.n), jnp.float32))

            def step(_, a_smem, b_smem, acc_ref):
                plgpu.wgmma(acc_ref, a_smem, b_smem.at[:, pl.ds(wg * tiles.n, tiles.n)])
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(step, context)(a_gmem.at[pl.ds(mi * cta_m, cta_m), :],
                                    b_gmem.at[:, pl.ds(ni * cta_n, cta_n)], allocations=ring)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return ring_allocs, scoped


def _sub_tiles(tiles):
    """The epilogue's sub-tiles of a warpgroup's tile, as (row, col) offsets."""
    rows, cols = tiles.epilogue
    return [(i * rows, j * cols) for i in range(tiles.m // rows) for j in range(tiles.n // cols)]


def _part(acc, offset, shape):
    return acc[offset[0]:offset[0] + shape[0], offset[1]:offset[1] + shape[1]]


def _stores_kernel(a_gmem, b_gmem, *outs, tiles, values):
    """``a @ b`` with an epilogue that stores ``values(part, dtype)`` (one sub-tile per output in ``outs``,
    all of ``dtype``) for each float32 sub-tile ``part`` of the accumulator, through ``tiles.slots`` SMEM
    slots."""
    shape, slots, dtype = tiles.epilogue, tiles.slots, outs[0].dtype

    def epilogue(acc, tile, *refs):
        *outs, out_smem = refs
        for s, offset in enumerate(_sub_tiles(tiles)):
            slot = s % slots
            # The stores from this slot's last use (one per output) must have read it.
            plgpu.wait_smem_to_gmem(len(outs) * (slots - 1), wait_read_only=True)
            for o, part in enumerate(values(_part(acc, offset, shape), dtype)):
                out_smem[tile.wg, slot, o] = part
            plgpu.commit_smem()
            for o, out in enumerate(outs):
                plgpu.copy_smem_to_gmem(out_smem.at[tile.wg, slot, o], tile.sub(out, offset, shape))

    ring, scoped = _product_kernel(a_gmem, b_gmem, *outs, tiles=tiles, epilogue=epilogue)
    out_smem = plgpu.SMEM((COMPUTE_WARPGROUPS, slots, len(outs), *shape), dtype, transforms=_swizzled(shape, dtype))
    pl.run_scoped(scoped, ring, out_smem, collective_axes="wg")


def _h_and_gelu(acc, dtype):
    h = acc.astype(dtype)
    return h, gelu(h.astype(jnp.float32)).astype(dtype)


def _gelu_grad_product_kernel(dy_gmem, w_t_gmem, h_gmem, dh_gmem, *, tiles):
    shape, subs = tiles.epilogue, _sub_tiles(tiles)

    def prologue(tile, h_gmem, dh_gmem, h_smem, bars):
        # h's tile loads while the products run. The previous tile's dh, stored from the same SMEM, must
        # have left it first.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for s, offset in enumerate(subs):
            b = tile.wg * len(subs) + s
            plgpu.copy_gmem_to_smem(tile.sub(h_gmem, offset, shape), h_smem.at[b], bars.at[b])

    def epilogue(acc, tile, h_gmem, dh_gmem, h_smem, bars):
        # Each sub-tile of h is overwritten in place by dh and stored from there.
        for s, offset in enumerate(subs):
            b = tile.wg * len(subs) + s
            plgpu.barrier_wait(bars.at[b])
            dh = _part(acc, offset, shape) * gelu_derivative(h_smem[b].astype(jnp.float32))
            h_smem[b] = dh.astype(dh_gmem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(h_smem.at[b], tile.sub(dh_gmem, offset, shape))

    ring, scoped = _product_kernel(dy_gmem, w_t_gmem, h_gmem, dh_gmem, tiles=tiles, epilogue=epilogue,
                                   prologue=prologue)
    count = COMPUTE_WARPGROUPS * len(subs)
    h_smem = plgpu.SMEM((count, *shape), h_gmem.dtype, transforms=_swizzled(shape, h_gmem.dtype))
    bars = plgpu.Barrier(num_barriers=count)
    pl.run_scoped(scoped, ring, h_smem, bars, collective_axes="wg")


def _num_programs(interpret):
    if interpret:
        return 2
    device = jax.devices()[0]
    return device.core_count if device.platform == "gpu" else 132  # 132: H100 and H200 SXM


def _launch(kernel, operands, out_type, *, tiles, interpret, name=None):
    m, k = operands[0].shape
    tiles.check(m, k, operands[1].shape[1])
    return plgpu.kernel(
        functools.partial(kernel, tiles=tiles), out_type=out_type, grid=(_num_programs(interpret),),
        grid_names=("sm",), thread_name="wg", num_threads=COMPUTE_WARPGROUPS + 1,  # + the memory warpgroup
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             approx_math=True),
        interpret=interpret_params(interpret), kernel_name=name or kernel.__name__.strip("_"),
    )(*operands)


def gelu_product(x, w, *, interpret=False, tiles=TILES):
    """``(h, gelu(h))`` for ``h = x @ w``: x ``[M, K]``, w ``[K, N]``, both bf16."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    kernel = functools.partial(_stores_kernel, values=_h_and_gelu)
    return _launch(kernel, (x, w), (out, out), tiles=tiles, interpret=interpret, name="gelu_product_kernel")


def gelu_grad_product(dy, w_t, h, *, interpret=False, tiles=TILES):
    """``(dy @ w_t) * gelu'(h)``: dy ``[M, K]``, w_t ``[K, N]``, h ``[M, N]``, all bf16."""
    return _launch(_gelu_grad_product_kernel, (dy, w_t, h), jax.ShapeDtypeStruct(h.shape, h.dtype), tiles=tiles,
                   interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gelu_mlp(x, w_fc, w_proj, interpret=False):
    """``gelu(x @ w_fc) @ w_proj`` for x ``[..., d]`` and bf16 weights, GELU in the products' epilogues."""
    return _gelu_mlp_forward(x, w_fc, w_proj, interpret)[0]


def _gelu_mlp_forward(x, w_fc, w_proj, interpret):
    x2 = x.reshape(-1, x.shape[-1])
    h, a = (checkpoint_name(t, RESIDUAL_NAME) for t in gelu_product(x2, w_fc, interpret=interpret))
    y = jnp.dot(a, w_proj)
    return y.reshape(*x.shape[:-1], -1), (x2, w_fc, w_proj, h, a)


def _gelu_mlp_backward(interpret, residuals, dy):
    x2, w_fc, w_proj, h, a = residuals
    dy2 = dy.reshape(-1, dy.shape[-1])
    dh = gelu_grad_product(dy2, w_proj.T, h, interpret=interpret)
    f32 = dict(preferred_element_type=jnp.float32)
    # In x's dtype straight from the product (float32 accumulation): a float32 result would cost a pass
    # of its own to round.
    dx = jnp.dot(dh, w_fc.T, preferred_element_type=x2.dtype)
    dw_fc = jnp.dot(x2.T, dh, **f32).astype(w_fc.dtype)
    dw_proj = jnp.dot(a.T, dy2, **f32).astype(w_proj.dtype)
    return dx.reshape(*dy.shape[:-1], -1), dw_fc, dw_proj


gelu_mlp.defvjp(_gelu_mlp_forward, _gelu_mlp_backward)
