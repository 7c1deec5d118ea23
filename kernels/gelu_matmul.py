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
tried and timed slower on an H200 (0.70 vs 0.57 ms, docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

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
    """One compute warpgroup's ``m x n`` output tile (the two lie side by side along n), the depth
    ``k`` of each loaded slice, the SMEM ring's ``stages``, the ``epilogue`` sub-tile side, the width
    of the snake in which output tiles are visited (neighbours share operand slices in L2), the
    programs per SM (with two, one program's epilogue can overlap the other's products) and the wgmma
    groups ``in_flight`` when a step ends (its SMEM slot is released that many steps later; with 1 the
    next step's products are issued before the last ones finish)."""
    m: int = 128
    n: int = 128
    k: int = 64
    stages: int = 3  # 4 does not fit beside the epilogue's SMEM
    epilogue: int = 64
    snake_width: int = 8
    per_sm: int = 1
    in_flight: int = 0

    def check(self, m, k, n):
        cta_n = COMPUTE_WARPGROUPS * self.n
        if m % self.m or n % cta_n or k % self.k:
            raise ValueError(f"gelu_matmul: a [{m}, {k}] x [{k}, {n}] product needs m a multiple of {self.m}, "
                             f"n of {cta_n} and k of {self.k} (see supports())")


TILES = Tiles()  # the fastest of the tiles timed on an H200 (docs/benchmarks.md)


def supports(x, w_fc) -> bool:
    """bf16 operands whose shapes the tiles divide: both products are ``[tokens, d] x [d, 4 d]``."""
    m, (d, n) = math.prod(x.shape[:-1]), w_fc.shape
    divisible = m % TILES.m == 0 and d % TILES.k == 0 and n % (COMPUTE_WARPGROUPS * TILES.n) == 0
    return x.dtype == w_fc.dtype == jnp.bfloat16 and divisible


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


def _product_kernel(a_gmem, b_gmem, *refs, tiles: Tiles, epilogue, prologue=None):
    """Loops over ``[tiles.m, 2 tiles.n]`` output tiles of ``a @ b``. Per tile, each compute warpgroup
    ``wg`` calls ``prologue(rows, cols, wg, *refs, *scratch)`` before its products and
    ``epilogue(acc, rows, cols, wg, *refs, *scratch)`` after, ``acc`` its float32 accumulator of
    output ``[rows, cols]``. Returns the SMEM ring's allocations and the body that takes them and
    ``scratch``."""
    m, k = a_gmem.shape
    n = b_gmem.shape[1]
    cta_n = COMPUTE_WARPGROUPS * tiles.n
    m_tiles, n_tiles = m // tiles.m, n // cta_n

    def pipeline(body, context):
        ring = dict(memory_space=plgpu.SMEM, transforms=_swizzled((tiles.m, tiles.k), a_gmem.dtype),
                    delay_release=tiles.in_flight)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k // tiles.k,), memory_registers=MEMORY_REGISTERS, wg_axis="wg",
            num_compute_wgs=COMPUTE_WARPGROUPS,
            max_concurrent_steps=tiles.stages, compute_context=context,
            in_specs=[plgpu.BlockSpec((tiles.m, tiles.k), lambda i: (0, i), **ring),
                      plgpu.BlockSpec((tiles.k, cta_n), lambda i: (i, 0), **ring)])

    no_op = lambda *_, **__: None  # allocations do not depend on the body
    ring_allocs = pipeline(no_op, no_op).get_allocations(a_gmem, b_gmem)

    def scoped(ring, *scratch):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _(loop):
            mi, ni = plgpu.planar_snake(loop.index[0], (m_tiles, n_tiles), 1, tiles.snake_width)
            rows = pl.ds(mi * tiles.m, tiles.m)
            cols = pl.ds(ni * cta_n + wg * tiles.n, tiles.n)

            def context(run):
                if prologue is not None:
                    prologue(rows, cols, wg, *refs, *scratch)

                def with_acc(acc_ref):
                    run(acc_ref)
                    epilogue(acc_ref[...], rows, cols, wg, *refs, *scratch)
                pl.run_scoped(with_acc, plgpu.ACC((tiles.m, tiles.n), jnp.float32))

            def step(_, a_smem, b_smem, acc_ref):
                plgpu.wgmma(acc_ref, a_smem, b_smem.at[:, pl.ds(wg * tiles.n, tiles.n)])
                plgpu.wgmma_wait(tiles.in_flight)
                return acc_ref

            pipeline(step, context)(a_gmem.at[rows, :], b_gmem.at[:, pl.ds(ni * cta_n, cta_n)],
                                    allocations=ring)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return ring_allocs, scoped


def _sub_tiles(tiles):
    e = tiles.epilogue
    return [(i, j) for i in range(tiles.m // e) for j in range(tiles.n // e)]


def _gelu_product_kernel(x_gmem, w_gmem, h_gmem, a_gmem, *, tiles):
    e = tiles.epilogue
    subs = _sub_tiles(tiles)

    def epilogue(acc, rows, cols, wg, h_gmem, a_gmem, out_smem):
        for s, (i, j) in enumerate(subs):
            slot = s % 2
            h = acc[i * e:(i + 1) * e, j * e:(j + 1) * e].astype(h_gmem.dtype)
            # The outputs written two sub-tiles ago (this slot's) must have left SMEM: two copies each.
            plgpu.wait_smem_to_gmem(2, wait_read_only=True)
            out_smem[wg, slot, 0] = h
            out_smem[wg, slot, 1] = gelu(h.astype(jnp.float32)).astype(a_gmem.dtype)
            plgpu.commit_smem()
            for o, out in enumerate((h_gmem, a_gmem)):
                plgpu.copy_smem_to_gmem(out_smem.at[wg, slot, o],
                                        out.at[rows, cols].at[pl.ds(i * e, e), pl.ds(j * e, e)])

    ring, scoped = _product_kernel(x_gmem, w_gmem, h_gmem, a_gmem, tiles=tiles, epilogue=epilogue)
    out_smem = plgpu.SMEM((COMPUTE_WARPGROUPS, 2, 2, e, e), h_gmem.dtype, transforms=_swizzled((e, e), h_gmem.dtype))
    pl.run_scoped(scoped, ring, out_smem, collective_axes="wg")


def _gelu_grad_product_kernel(dy_gmem, w_t_gmem, h_gmem, dh_gmem, *, tiles):
    e = tiles.epilogue
    subs = _sub_tiles(tiles)

    def prologue(rows, cols, wg, h_gmem, dh_gmem, h_smem, bars):
        # h's tile loads while the products run. The previous tile's dh, stored from the same SMEM, must
        # have left it first.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for s, (i, j) in enumerate(subs):
            plgpu.copy_gmem_to_smem(h_gmem.at[rows, cols].at[pl.ds(i * e, e), pl.ds(j * e, e)],
                                    h_smem.at[wg, s], bars.at[wg * len(subs) + s])

    def epilogue(acc, rows, cols, wg, h_gmem, dh_gmem, h_smem, bars):
        # Each sub-tile of h is overwritten in place by dh and stored from there.
        for s, (i, j) in enumerate(subs):
            plgpu.barrier_wait(bars.at[wg * len(subs) + s])
            h = h_smem[wg, s].astype(jnp.float32)
            h_smem[wg, s] = (acc[i * e:(i + 1) * e, j * e:(j + 1) * e] * gelu_derivative(h)).astype(dh_gmem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(h_smem.at[wg, s], dh_gmem.at[rows, cols].at[pl.ds(i * e, e), pl.ds(j * e, e)])

    ring, scoped = _product_kernel(dy_gmem, w_t_gmem, h_gmem, dh_gmem, tiles=tiles, epilogue=epilogue,
                                   prologue=prologue)
    h_smem = plgpu.SMEM((COMPUTE_WARPGROUPS, len(subs), e, e), h_gmem.dtype,
                        transforms=_swizzled((e, e), h_gmem.dtype))
    bars = plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS * len(subs))
    pl.run_scoped(scoped, ring, h_smem, bars, collective_axes="wg")


def _num_programs(tiles, interpret):
    if interpret:
        return 2
    device = jax.devices()[0]
    return tiles.per_sm * (device.core_count if device.platform == "gpu" else 132)  # 132: H100 and H200 SXM


def _launch(kernel, operands, out_type, *, tiles, interpret):
    m, k = operands[0].shape
    tiles.check(m, k, operands[1].shape[1])
    return plgpu.kernel(
        functools.partial(kernel, tiles=tiles), out_type=out_type, grid=(_num_programs(tiles, interpret),),
        grid_names=("sm",), thread_name="wg", num_threads=COMPUTE_WARPGROUPS + 1,  # + the memory warpgroup
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             approx_math=True),
        interpret=interpret_params(interpret), kernel_name=kernel.__name__.strip("_"),
    )(*operands)


def gelu_product(x, w, *, interpret=False, tiles=TILES):
    """``(h, gelu(h))`` for ``h = x @ w``: x ``[M, K]``, w ``[K, N]``, both bf16."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    return _launch(_gelu_product_kernel, (x, w), (out, out), tiles=tiles, interpret=interpret)


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
