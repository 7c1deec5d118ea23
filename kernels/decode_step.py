"""One decoding step of a recurrent attention layer in one kernel (Pallas, Triton lowering): the short convs
over q, k and v with their caches, the forget gate (GLA) or beta and decay (the delta rules), the state
update and readout, and the per-head RMSNorm with its swish gate.

Under XLA a GPT-2 Medium GLA layer took about a dozen small kernels for this between its input and output
products, each a few microseconds of launch and latency for a few kilobytes of data. Here a program per
(row, head) reads that head's columns of the layer's joined input projection ``y [B, W]`` (q | k | v, then
the narrow projections: GLA's low-rank gate input, or the delta rules' beta and decay inputs), its conv
caches and state ``[K, V]``, and writes the normed output ``[V]``, the state and the caches in place (the
inputs are aliased to the outputs).

Values are rounded to the compute dtype where the layer's XLA step rounds them (conv outputs, the L2-normed
q and k, GLA's gate, the recurrence's output), so the kernel gives the forward's numbers, not more precise
ones.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from .common import compiler_params, is_power_of_two

RULES = ("gla", "delta", "gated_delta")
L2_EPS = 1e-6  # the ops' q/k L2 normalisation


@dataclasses.dataclass(frozen=True)
class Step:
    """The static description of a layer's step: its rule, heads, per-head key and value dims, conv width,
    the norm's eps, whether the output norm is gated and the first column of y holding the output gate's
    projection (None: it comes as an array of its own), GLA's gate normaliser and low rank."""
    rule: str
    heads: int
    key_dim: int
    value_dim: int
    conv_width: int
    eps: float
    gated_norm: bool
    gate_column: int | None = None
    gate_normalizer: float = 1.0
    gate_rank: int = 0

    @property
    def extras_column(self) -> int:
        """The first column of y after q | k | v."""
        return self.heads * (2 * self.key_dim + self.value_dim)


def supports(step: Step) -> bool:
    """Triton's block shapes: per-head dims (and GLA's gate rank) powers of two; a short conv to cache."""
    dims = [step.key_dim, step.value_dim] + ([step.gate_rank] if step.rule == "gla" else [])
    return step.rule in RULES and step.conv_width > 1 and all(is_power_of_two(d) for d in dims)


def _separate_gate(step: Step) -> bool:
    return step.gated_norm and step.gate_column is None


def _log_sigmoid(x):
    return jnp.minimum(x, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _l2_normed(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x) + L2_EPS)


@dataclasses.dataclass(frozen=True)
class HeadRefs:
    """The refs one (row, head) of a step reads and writes, each whole (the kernel indexes rows and heads):
    y ``[B, W]``, the separate gate ``[B, H*V]`` (or None), the q, k and v conv caches ``[B, (conv_width - 1)
    * C]`` and their kernels ``[conv_width * C]``, the state ``[B, H, K, V]``, the norm's weight ``[V]``, the
    rule's params (GLA's up kernel ``[rank, H*K]`` and bias ``[H*K]``, the gated delta rule's ``[H]`` A_log
    and dt_bias), the output ``[B, H*V]`` and the state and caches written (in place: aliased)."""
    y: object
    gate: object
    caches: tuple
    weights: tuple
    state: object
    norm: object
    params: tuple
    out: object
    state_out: object
    caches_out: tuple


def head_step(step: Step, refs: HeadRefs, row, h, *, dtype, interpret: bool):
    """Row ``row``'s head ``h`` of the step (scalars: the program ids)."""
    f32 = jnp.float32
    rounded = lambda x: x.astype(dtype).astype(f32)
    K, V, H = step.key_dim, step.value_dim, step.heads
    caches, weights = refs.caches, refs.weights

    def taps(piece, column, channels, dim):
        """This head's ``dim`` channels of a piece (starting at y's ``column``; its cache's rows of ``channels``,
        oldest first): the conv's inputs, the new one last."""
        start = h * dim
        rows = [caches[piece][row, pl.ds(j * channels + start, dim)] for j in range(step.conv_width - 1)]
        return [r.astype(f32) for r in rows] + [refs.y[row, pl.ds(column + start, dim)].astype(f32)]

    def conv(piece, inputs, channels, dim):
        """silu of the causal conv; shifts the piece's cache by the new input."""
        start = h * dim
        cache_out = refs.caches_out[piece]
        for j in range(step.conv_width - 1):
            cache_out[row, pl.ds(j * channels + start, dim)] = inputs[j + 1].astype(cache_out.dtype)
        pre = sum(tap * weights[piece][pl.ds(j * channels + start, dim)] for j, tap in enumerate(inputs))
        return rounded(pre * jax.nn.sigmoid(pre))

    Dk, Dv = H * K, H * V
    pieces = [(0, Dk, K), (Dk, Dk, K), (2 * Dk, Dv, V)]  # q, k, v: first column in y, channels, per head
    inputs = [taps(piece, *layout) for piece, layout in enumerate(pieces)]
    S = refs.state[row, h]
    # The caches and the state are updated in place (aliased): every thread's loads of them are done before
    # any thread stores, since a value of a short row is held by several threads and the one that stores it
    # need not be the one whose load is still in flight. (Interpret mode runs a program's steps in order.)
    if not interpret:
        plgpu_triton.debug_barrier()
    q, k, v = (conv(piece, inputs[piece], channels, dim) for piece, (_, channels, dim) in enumerate(pieces))
    extra = lambda column, width: refs.y[row, pl.ds(step.extras_column + column, width)].astype(f32)
    if step.rule == "gla":
        up_ref, bias_ref = refs.params
        low = extra(0, step.gate_rank)
        pre = rounded(jnp.sum(low[:, None] * up_ref[:, pl.ds(h * K, K)].astype(f32), axis=0))
        gate = rounded(_log_sigmoid(pre + bias_ref[pl.ds(h * K, K)]) / step.gate_normalizer)
        S = jnp.exp(gate)[:, None] * S + k[:, None] * v[None, :]
    else:
        q, k = rounded(_l2_normed(q)), rounded(_l2_normed(k))
        beta = jax.nn.sigmoid(jnp.sum(extra(h, 1)))
        if step.rule == "gated_delta":
            a_log_ref, dt_bias_ref = refs.params
            a = jnp.sum(extra(H + h, 1) + dt_bias_ref[pl.ds(h, 1)])
            S = jnp.exp(-jnp.exp(jnp.sum(a_log_ref[pl.ds(h, 1)])) * _softplus(a)) * S
        u = beta * (v - jnp.sum(k[:, None] * S, axis=0))
        S = S + k[:, None] * u[None, :]
    refs.state_out[row, h] = S
    o = rounded(K ** -0.5 * jnp.sum(q[:, None] * S, axis=0))
    o = o * jax.lax.rsqrt(jnp.sum(o * o) / V + step.eps) * refs.norm[...]
    if step.gated_norm:
        if refs.gate is not None:
            g = refs.gate[row, pl.ds(h * V, V)]
        else:
            g = refs.y[row, pl.ds(step.gate_column + h * V, V)]
        g = g.astype(f32)
        o = o * g * jax.nn.sigmoid(g)
    refs.out[row, pl.ds(h * V, V)] = o.astype(refs.out.dtype)


def step_operands(step: Step, y, gate, caches, weights, state, norm_weight, params):
    """The step's inputs as its kernel takes them, in `HeadRefs` order (up to the outputs): caches flattened
    to ``[B, (conv_width - 1) * C]``, the conv kernels, norm weight and float params in float32."""
    B = y.shape[0]
    f32 = jnp.float32
    if step.rule == "gla":
        up, bias = params
        params = (up, bias.astype(f32))
    else:
        params = tuple(p.astype(f32) for p in params)
    return (y, gate, tuple(c.reshape(B, -1) for c in caches), tuple(w.reshape(-1).astype(f32) for w in weights),
            state, norm_weight.astype(f32), params)


def unflatten_refs(step: Step, refs) -> HeadRefs:
    """`HeadRefs` from a kernel's flat refs: the operands of `step_operands` (the gate only when apart), then
    the output, state and caches written."""
    refs = list(refs)
    take = lambda n: tuple(refs.pop(0) for _ in range(n))
    y, = take(1)
    gate = refs.pop(0) if _separate_gate(step) else None
    caches, weights, (state, norm) = take(3), take(3), take(2)
    params = take(len(refs) - 5)
    out, state_out, *caches_out = refs
    return HeadRefs(y, gate, caches, weights, state, norm, params, out, state_out, tuple(caches_out))


def step_aliases(first_cache: int) -> dict:
    """``input_output_aliases`` of the kernel, whose caches are inputs from ``first_cache`` on and whose outputs
    are the output, then the state and the caches (written in place)."""
    state = first_cache + 6  # after the three caches and the three conv kernels
    return {state: 1, **{first_cache + i: 2 + i for i in range(3)}}


def _kernel(*refs, step: Step, dtype, interpret: bool):
    head_step(step, unflatten_refs(step, refs), pl.program_id(0), pl.program_id(1), dtype=dtype,
              interpret=interpret)


def decode_step(step: Step, y, gate, caches, weights, state, norm_weight, params=(), *, interpret=False):
    """One token of every row through a layer's recurrence: ``(o [B, H*V] in y's dtype, state, caches)``.

    y ``[B, W]`` the joined input projection (with the output gate's from ``step.gate_column`` when that is
    set); gate ``[B, H*V]`` the output gate's projection otherwise (None without one); caches the q, k and v
    convs' ``[B, conv_width - 1, C]``; weights their kernels ``[conv_width, C]``; state ``[B, H, K, V]``
    float32; norm_weight ``[V]``; params GLA's ``(up kernel [rank, H*K], up bias [H*K])``, the gated delta
    rule's ``(A_log [H], dt_bias [H])``, else ().
    """
    if not supports(step):
        raise ValueError(f"decode_step: unsupported {step}: per-head dims (and the gate rank) must be powers of "
                         "two and the layer must have a short conv")
    B = y.shape[0]
    H, V = step.heads, step.value_dim
    y, gate, flat_caches, flat_weights, state, norm_weight, params = step_operands(
        step, y, gate, caches, weights, state, norm_weight, params)
    separate = _separate_gate(step)
    inputs = [y, *([gate] if separate else []), *flat_caches, *flat_weights, state, norm_weight, *params]
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, h: (0,) * len(a.shape))
    aliases = step_aliases(1 + separate)
    outputs = [jax.ShapeDtypeStruct((B, H * V), y.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32),
               *[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in flat_caches]]
    o, state, *flat_caches = pl.pallas_call(
        functools.partial(_kernel, step=step, dtype=y.dtype, interpret=interpret), grid=(B, H),
        in_specs=[whole(a) for a in inputs], out_specs=[whole(a) for a in outputs], out_shape=outputs,
        input_output_aliases=aliases, compiler_params=compiler_params(num_warps=4, num_stages=1),
        interpret=interpret, name=f"{step.rule}_decode_step",
    )(*inputs)
    return o, state, [c.reshape(cache.shape) for c, cache in zip(flat_caches, caches)]
