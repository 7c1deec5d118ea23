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

from .common import compiler_params

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


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(step: Step) -> bool:
    """Triton's block shapes: per-head dims (and GLA's gate rank) powers of two; a short conv to cache."""
    dims = [step.key_dim, step.value_dim] + ([step.gate_rank] if step.rule == "gla" else [])
    return step.rule in RULES and step.conv_width > 1 and all(_power_of_two(d) for d in dims)


def _separate_gate(step: Step) -> bool:
    return step.gated_norm and step.gate_column is None


def _log_sigmoid(x):
    return jnp.minimum(x, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _l2_normed(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x) + L2_EPS)


def _kernel(*refs, step: Step, dtype, interpret: bool):
    f32 = jnp.float32
    rounded = lambda x: x.astype(dtype).astype(f32)
    h = pl.program_id(1)
    K, V, H = step.key_dim, step.value_dim, step.heads
    refs = list(refs)
    y_ref = refs.pop(0)
    gate_ref = refs.pop(0) if _separate_gate(step) else None
    caches, weights = refs[0:3], refs[3:6]
    state_ref, norm_ref = refs[6:8]
    params, (o_ref, state_out, *caches_out) = refs[8:-5], refs[-5:]

    def taps(piece, column, channels, dim):
        """This head's ``dim`` channels of a piece (starting at y's ``column``; its cache's rows of ``channels``,
        oldest first): the conv's inputs, the new one last."""
        start = h * dim
        rows = [caches[piece][pl.ds(j * channels + start, dim)] for j in range(step.conv_width - 1)]
        return [r.astype(f32) for r in rows] + [y_ref[pl.ds(column + start, dim)].astype(f32)]

    def conv(piece, inputs, channels, dim):
        """silu of the causal conv; shifts the piece's cache by the new input."""
        start = h * dim
        for j in range(step.conv_width - 1):
            caches_out[piece][pl.ds(j * channels + start, dim)] = inputs[j + 1].astype(caches_out[piece].dtype)
        pre = sum(tap * weights[piece][pl.ds(j * channels + start, dim)] for j, tap in enumerate(inputs))
        return rounded(pre * jax.nn.sigmoid(pre))

    Dk, Dv = H * K, H * V
    pieces = [(0, Dk, K), (Dk, Dk, K), (2 * Dk, Dv, V)]  # q, k, v: first column in y, channels, per head
    inputs = [taps(piece, *layout) for piece, layout in enumerate(pieces)]
    S = state_ref[...]
    # The caches and the state are updated in place (aliased): every thread's loads of them are done before
    # any thread stores, since a value of a short row is held by several threads and the one that stores it
    # need not be the one whose load is still in flight. (Interpret mode runs a program's steps in order.)
    if not interpret:
        plgpu_triton.debug_barrier()
    q, k, v = (conv(piece, inputs[piece], channels, dim) for piece, (_, channels, dim) in enumerate(pieces))
    if step.rule == "gla":
        up_ref, bias_ref = params
        low = y_ref[pl.ds(step.extras_column, step.gate_rank)].astype(f32)
        pre = rounded(jnp.sum(low[:, None] * up_ref[...].astype(f32), axis=0))
        gate = rounded(_log_sigmoid(pre + bias_ref[...]) / step.gate_normalizer)
        S = jnp.exp(gate)[:, None] * S + k[:, None] * v[None, :]
    else:
        q, k = rounded(_l2_normed(q)), rounded(_l2_normed(k))
        beta = jax.nn.sigmoid(jnp.sum(y_ref[pl.ds(step.extras_column + h, 1)].astype(f32)))
        if step.rule == "gated_delta":
            a_log_ref, dt_bias_ref = params
            a = jnp.sum(y_ref[pl.ds(step.extras_column + H + h, 1)].astype(f32) + dt_bias_ref[...])
            S = jnp.exp(-jnp.exp(jnp.sum(a_log_ref[...])) * _softplus(a)) * S
        u = beta * (v - jnp.sum(k[:, None] * S, axis=0))
        S = S + k[:, None] * u[None, :]
    state_out[...] = S
    o = rounded(K ** -0.5 * jnp.sum(q[:, None] * S, axis=0))
    o = o * jax.lax.rsqrt(jnp.sum(o * o) / V + step.eps) * norm_ref[...]
    if step.gated_norm:
        g = gate_ref[...] if gate_ref is not None else y_ref[pl.ds(step.gate_column + h * V, V)]
        g = g.astype(f32)
        o = o * g * jax.nn.sigmoid(g)
    o_ref[...] = o.astype(o_ref.dtype)


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
    B, W = y.shape
    H, K, V = step.heads, step.key_dim, step.value_dim
    f32 = jnp.float32
    row = lambda width: pl.BlockSpec((None, width), lambda b, h: (b, 0))
    head_values = pl.BlockSpec((None, V), lambda b, h: (b, h))
    whole = lambda a: pl.BlockSpec(a.shape, lambda b, h: (0,) * a.ndim)
    flat_caches = [c.reshape(B, -1) for c in caches]
    flat_weights = [w.reshape(-1).astype(f32) for w in weights]
    if step.rule == "gla":
        up, bias = params
        params = (up, bias.astype(f32))
        param_specs = [pl.BlockSpec((step.gate_rank, K), lambda b, h: (0, h)), pl.BlockSpec((K,), lambda b, h: (h,))]
    else:
        params = tuple(p.astype(f32) for p in params)
        param_specs = [pl.BlockSpec((1,), lambda b, h: (h,)) for _ in params]
    separate = _separate_gate(step)
    cache_specs = [row(c.shape[1]) for c in flat_caches]  # each aliased to its output
    inputs = [y, *([gate] if separate else []), *flat_caches, *flat_weights, state, norm_weight.astype(f32),
              *params]
    in_specs = [row(W), *([head_values] if separate else []), *cache_specs,
                *[whole(w) for w in flat_weights], pl.BlockSpec((None, None, K, V), lambda b, h: (b, h, 0, 0)),
                whole(norm_weight), *param_specs]
    first_cache = 1 + separate
    state_index = first_cache + 6
    aliases = {state_index: 1, first_cache: 2, first_cache + 1: 3, first_cache + 2: 4}
    o, state, *flat_caches = pl.pallas_call(
        functools.partial(_kernel, step=step, dtype=y.dtype, interpret=interpret), grid=(B, H), in_specs=in_specs,
        out_specs=[head_values, in_specs[state_index], *cache_specs],
        out_shape=[jax.ShapeDtypeStruct((B, H * V), y.dtype), jax.ShapeDtypeStruct(state.shape, f32),
                   *[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in flat_caches]],
        input_output_aliases=aliases, compiler_params=compiler_params(num_warps=4, num_stages=1),
        interpret=interpret, name=f"{step.rule}_decode_step",
    )(*inputs)
    return o, state, [c.reshape(cache.shape) for c, cache in zip(flat_caches, caches)]
