"""A recurrent block's whole decoding step in one persistent kernel (Pallas, Triton lowering): the first
LayerNorm, the joined input product, the layer's step (``decode_step.head_step``), the output product and
residual add, the second LayerNorm, the MLP and its residual add.

Run as a kernel per operation, a GPT-2 Medium layer's decoding step at two rows is a dozen launches, each
streaming its few megabytes of weights with a ramp at its start and idle memory at its end: the products
read the weights at about 1.3 TB/s, 38 % of an H100's bandwidth (docs/generation.md). Here ``programs``
programs (at most one per SM, so that all are resident at once) run five phases, a barrier over the grid
between each two:

1. ``y = ln_1(x) w_in^T``, each program a tile of y's columns;
2. the step, a program per (row, head), writing ``o``;
3. ``x2 = x + o w_o^T``, each program a tile of x2's columns;
4. ``h = gelu(ln_2(x2) w_fc^T)``, each program a tile of hidden units;
5. ``out = x2 + h w_proj^T``, each program a tile of out's columns.

Every product's kernel is stored output-major (``[out, in]``, rows contiguous), so a tile is one contiguous
block. A phase's weight tile is loaded before the barrier in front of it: the weights do not depend on the
activations, so their reads are in flight while the grid waits. The products run on the CUDA cores, one row
at a time (this is for a few rows). Values are rounded to the compute dtype where the XLA block rounds them.

The barrier is one int32, ``sync`` (zero before first use, carried from call to call): arrivals count in its
low bits, barriers passed above them; the last program to arrive resets the count and advances the generation
in one acquire-release add, the others spin on volatile loads until the generation moves, then acquire. So a
phase reads what other programs wrote before the barrier with plain loads, as after CUDA's grid-wide sync.
Every program must be resident at once, or the barrier never opens: the grid is at most one program per SM
and nothing else may hold the GPU's SMs meanwhile (no other stream's kernels, no MPS share). Interpret mode
runs programs one after another, which would spin forever; there the grid gets a leading phase axis instead,
and iterating it in order is the barrier.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from . import decode_step
from .common import compiler_params, is_power_of_two
from .decode_mlp import layer_norm_row

# A program's weight tile per phase, held in registers; with the next phase's tile loaded early, two are live
# at once, as in kernels.decode_mlp (two [32, 1024] bf16 tiles a program at NUM_WARPS).
TILE_BYTES = 64 * 1024
NUM_WARPS = 8
PHASES = 5
BLOCK_OPERANDS = 9  # x, ln_1's scale and bias, w_in, w_o, ln_2's scale and bias, w_fc, w_proj; then the step's:
STEP_OPERANDS = 8  # the three conv caches and kernels, the state, the norm's weight (and the rule's params)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class Tiling:
    """A product with ``outputs`` rows of weights, each ``inputs`` wide, split over ``programs``: ``rows`` per
    tile (a power of two), program ``pid`` taking tile ``pid`` (masked past ``outputs``; `tiles` at most
    ``programs`` where the kernel supports the block)."""
    outputs: int
    inputs: int
    programs: int
    itemsize: int

    @property
    def rows(self) -> int:
        fit = TILE_BYTES // (self.inputs * self.itemsize)
        largest = 1 << (max(fit, 1).bit_length() - 1)  # the largest power of two that fits (at least one row)
        return min(_next_power_of_two(math.ceil(self.outputs / self.programs)), largest)

    @property
    def tiles(self) -> int:
        return math.ceil(self.outputs / self.rows)


@dataclasses.dataclass(frozen=True)
class Block:
    """The static description of a block's step: the layer's `decode_step.Step`, the residual width, the joined
    input product's, the MLP's hidden units, the LayerNorms' eps and the grid's programs."""
    step: decode_step.Step
    width: int
    joined_width: int  # w_in's rows: q | k | v, the narrow projections, the output gate's
    hidden: int
    eps: float
    programs: int

    def tilings(self, itemsize: int) -> tuple[Tiling, ...]:
        """The four products': input, output, c_fc, c_proj."""
        values = self.step.heads * self.step.value_dim
        shapes = [(self.joined_width, self.width), (self.width, values), (self.hidden, self.width),
                  (self.width, self.hidden)]
        return tuple(Tiling(n, k, self.programs, itemsize) for n, k in shapes)


def supports(block: Block, rows: int, itemsize: int) -> bool:
    """The step kernel's layers with the output gate in the joined product; power-of-two widths (Triton's block
    shapes); a grid with a program for each (row, head) of the step and each tile of a product."""
    step = block.step
    if not decode_step.supports(step) or step.gated_norm != (step.gate_column is not None):
        return False
    widths = [block.width, block.hidden, step.heads * step.value_dim]
    if not all(is_power_of_two(w) for w in widths) or rows * step.heads > block.programs:
        return False
    return all(t.tiles <= block.programs for t in block.tilings(itemsize))


COUNT_BITS = 16  # sync's low bits count the arrivals, the high bits the barriers passed


def _grid_barrier(sync_ref, programs: int):
    """Waits until all ``programs`` have arrived. ``sync[0]``: arrivals in the low bits, the generation above;
    the last to arrive resets the count and advances the generation in one add."""
    plgpu_triton.debug_barrier()  # every thread's stores are issued before the program arrives
    seen = plgpu_triton.atomic_add(sync_ref, 0, jnp.int32(1))
    generation = seen >> COUNT_BITS
    last = (seen & ((1 << COUNT_BITS) - 1)) == programs - 1

    @pl.when(last)
    def _release():
        plgpu_triton.atomic_add(sync_ref, 0, jnp.int32((1 << COUNT_BITS) - programs))

    @pl.when(jnp.logical_not(last))
    def _wait():
        waiting = lambda now: (now >> COUNT_BITS) == generation
        # Volatile loads, which leave the word's L2 line to the arrivals; then an acquire: an atomic read whose
        # value a loop tests, so that it stays an acquiring atomic (one with its value unused may be emitted as
        # a reduction, which cannot acquire). Its mask, true once the spin ends, is the spin's only use: a
        # loop whose value goes unused is dropped before it reaches Triton.
        spun = lax.while_loop(waiting, lambda _: plgpu_triton.load(sync_ref.at[0], volatile=True), seen)
        acquire = lambda _: plgpu_triton.atomic_add(sync_ref, 0, jnp.int32(0), mask=spun != seen)
        lax.while_loop(waiting, acquire, seen)

    plgpu_triton.debug_barrier()


def _load_tile(w_ref, tiling: Tiling, pid):
    """Program ``pid``'s tile of a product's weights ``[outputs, inputs]``, with its first output row."""
    first = pid * tiling.rows
    shape = (tiling.rows, tiling.inputs)
    mask = (first + lax.broadcasted_iota(jnp.int32, shape, 0)) < tiling.outputs
    return first, plgpu_triton.load(w_ref.at[pl.ds(first, tiling.rows), :], mask=mask, other=0)


def _product_phase(tile, tiling: Tiling, row_inputs, finish, out_ref):
    """For each row r: ``out[r, tile's rows] = finish(r, columns, inputs_r w_tile^T)`` (float32), stored where
    the tile's rows exist; ``columns`` is ``(first, mask)`` of the tile's output columns."""
    first, w = tile
    w = w.astype(jnp.float32)
    valid = (first + lax.broadcasted_iota(jnp.int32, (tiling.rows,), 0)) < tiling.outputs
    for r, inputs in enumerate(row_inputs):
        value = finish(r, (first, valid), jnp.sum(w * inputs[None, :], axis=1))
        plgpu_triton.store(out_ref.at[jnp.int32(r), pl.ds(first, tiling.rows)], value.astype(out_ref.dtype),
                           mask=valid)


def _columns(ref, r, columns, n):
    """Row r's columns ``(first, mask)`` (n of them) of ref, in float32."""
    first, mask = columns
    return plgpu_triton.load(ref.at[jnp.int32(r), pl.ds(first, n)], mask=mask, other=0).astype(jnp.float32)


def _row(ref, r):
    return ref[r, :].astype(jnp.float32)


def _kernel(*refs, block: Block, rows: int, dtype, interpret: bool, n_params: int):
    step = block.step
    f32 = jnp.float32
    rounded = lambda v: v.astype(dtype).astype(f32)
    refs = list(refs)
    x, s1, b1, w_in, w_o, s2, b2, w_fc, w_proj = refs[:BLOCK_OPERANDS]
    step_in = refs[BLOCK_OPERANDS:BLOCK_OPERANDS + STEP_OPERANDS + n_params]
    # The input refs of sync, state and caches alias their outputs; the kernel uses the outputs.
    out, state_out, c0, c1, c2, sync, y, o, x2, hidden = refs[-10:]
    head = decode_step.unflatten_refs(step, [y, *step_in, o, state_out, c0, c1, c2])
    t_in, t_o, t_fc, t_proj = block.tilings(jnp.dtype(dtype).itemsize)
    phase, pid = (pl.program_id(0), pl.program_id(1)) if interpret else (None, pl.program_id(0))

    def phase_in(tile):
        normed = [layer_norm_row(_row(x, r), s1[...], b1[...], block.eps, dtype) for r in range(rows)]
        _product_phase(tile, t_in, normed, lambda r, c, v: rounded(v), y)

    def phase_step():
        @pl.when(pid < rows * step.heads)
        def _():
            decode_step.head_step(step, head, pid // step.heads, pid % step.heads, dtype=dtype, interpret=interpret)

    def phase_out(tile):
        values = [_row(o, r) for r in range(rows)]
        residual = lambda r, c, v: rounded(_columns(x, r, c, t_o.rows) + rounded(v))
        _product_phase(tile, t_o, values, residual, x2)

    def phase_fc(tile):
        normed = [layer_norm_row(_row(x2, r), s2[...], b2[...], block.eps, dtype) for r in range(rows)]
        gelu = lambda r, c, v: rounded(jax.nn.gelu(rounded(v), approximate=True))
        _product_phase(tile, t_fc, normed, gelu, hidden)

    def phase_proj(tile):
        values = [_row(hidden, r) for r in range(rows)]
        residual = lambda r, c, v: rounded(_columns(x2, r, c, t_proj.rows) + rounded(v))
        _product_phase(tile, t_proj, values, residual, out)

    if interpret:  # the grid's leading axis is the phase
        for p, run in enumerate([lambda: phase_in(_load_tile(w_in, t_in, pid)), phase_step,
                                 lambda: phase_out(_load_tile(w_o, t_o, pid)),
                                 lambda: phase_fc(_load_tile(w_fc, t_fc, pid)),
                                 lambda: phase_proj(_load_tile(w_proj, t_proj, pid))]):
            pl.when(phase == p)(run)
        return
    barrier = functools.partial(_grid_barrier, sync, block.programs)
    phase_in(_load_tile(w_in, t_in, pid))
    tile_o = _load_tile(w_o, t_o, pid)  # each tile loaded before the barrier in front of its phase
    barrier()
    phase_step()
    barrier()
    phase_out(tile_o)
    tile_fc = _load_tile(w_fc, t_fc, pid)
    barrier()
    phase_fc(tile_fc)
    tile_proj = _load_tile(w_proj, t_proj, pid)
    barrier()
    phase_proj(tile_proj)


def decode_block(block: Block, x, ln_1, w_in, w_o, ln_2, w_fc, w_proj, caches, weights, state, norm_weight,
                 params, sync, *, interpret: bool = False):
    """One decoding step of a block for every row of ``x [B, D]`` (compute dtype): ``(out [B, D], state,
    caches, sync)``.

    ln_1, ln_2: the LayerNorms' ``(scale, bias)`` ``[D]``; w_in ``[W, D]`` the joined input kernel
    (q | k | v | the narrow projections | the output gate's) transposed, w_o ``[D, H*V]``, w_fc ``[F, D]`` and
    w_proj ``[D, F]`` the other products' kernels transposed, all in the compute dtype; caches, weights,
    state, norm_weight and params as `decode_step.decode_step` takes them; sync an int32 scalar, zero before
    the first call, then each call's output.
    """
    rows = x.shape[0]
    dtype = x.dtype
    if not supports(block, rows, dtype.itemsize):
        raise ValueError(f"decode_block: unsupported {block} at {rows} rows: see kernels.decode_block.supports")
    f32 = jnp.float32
    step = block.step
    _, _, flat_caches, flat_weights, state, norm_weight, params = decode_step.step_operands(
        step, x, None, caches, weights, state, norm_weight, params)
    lns = [tuple(p.astype(f32) for p in ln) for ln in (ln_1, ln_2)]
    inputs = [x, *lns[0], w_in, w_o, *lns[1], w_fc, w_proj, *flat_caches, *flat_weights, state, norm_weight,
              *params, sync.reshape(1)]
    aliases = decode_step.step_aliases(BLOCK_OPERANDS, 0) | {len(inputs) - 1: 5}  # and sync, the last input
    values = step.heads * step.value_dim
    outputs = [jax.ShapeDtypeStruct((rows, block.width), dtype), jax.ShapeDtypeStruct(state.shape, f32),
               *[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in flat_caches], jax.ShapeDtypeStruct((1,), jnp.int32),
               *[jax.ShapeDtypeStruct((rows, n), dtype) for n in (block.joined_width, values, block.width,
                                                                   block.hidden)]]  # y, o, x2, hidden
    grid = (PHASES, block.programs) if interpret else (block.programs,)
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * len(a.shape))
    out, state, *flat_caches, sync = pl.pallas_call(
        functools.partial(_kernel, block=block, rows=rows, dtype=dtype, interpret=interpret, n_params=len(params)),
        grid=grid, in_specs=[whole(a) for a in inputs], out_specs=[whole(a) for a in outputs], out_shape=outputs,
        input_output_aliases=aliases, compiler_params=compiler_params(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret, name=f"{step.rule}_decode_block",
    )(*inputs)[:6]
    return out, state, [c.reshape(cache.shape) for c, cache in zip(flat_caches, caches)], sync.reshape(())
