"""Context parallelism for GLA: each sequence split over the `sequence` mesh axis.

Device i holds tokens [i T/n, (i+1) T/n) of every sequence. It runs the single-device op on its slice from a
zero state, giving its outputs and the state its slice leaves, S_i. The state entering slice i is then

    S_in(0) = initial state,    S_in(i+1) = A_i * S_in(i) + S_i,

with A_i = exp(sum of the slice's log gates) per key channel, or 0 when a document starts inside the slice (or
at its first token): the carried state never crosses a reset. The devices all-gather the small S_i and A_i
([B, H, K, V] and [B, H, K] each, whatever the length) and each runs that scan over the n slices. The entering
state then adds ``scale (q_t * exp(sum_{start <= j <= t} g_j)) @ S_in`` to each output t before the slice's
first reset. Everything is plain JAX inside `shard_map`, so the backward is autodiff's: through the local op's
own backward, and the all-gather's transpose (a reduce-scatter of state-sized gradients).

The layers' short causal convolutions need the previous slice's last conv_size - 1 inputs: `causal_conv`
sends them one device on (`ppermute`); left to the partitioner, the convolution's concatenation along the split
time axis moved whole activations between devices (all-to-all).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .mesh_axes import batch_axes

AXIS = "sequence"


def split() -> bool:
    """Whether the current mesh splits sequences: a `sequence` axis of several devices."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and AXIS in mesh.axis_names and mesh.shape[AXIS] > 1


def applies() -> bool:
    """Whether sequences are split and the code here still sees whole ones (not inside `shard_map` over
    `sequence`): a per-token computation must then open its own `shard_map` over the slices."""
    return split() and AXIS not in jax.sharding.get_abstract_mesh().manual_axes


def _per_device(fn, args, in_specs, out_specs):
    """`fn` on each device's slices: through `shard_map` over `sequence` and the batch axes, or called as
    it is where the code already runs per slice (inside `shard_map` over `sequence`)."""
    if not applies():
        return fn(*args)
    batch = batch_axes()
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names={*batch, AXIS},
                         check_vma=False)(*args)


def gla(local_op, q, k, v, g, *, scale, initial_state=None, output_final_state=False, segment_ids=None):
    """GLA over sequences split on the mesh's `sequence` axis; `local_op(q, k, v, g, segment_ids=)` is the
    single-device op run on each slice (returns its outputs and final state). Same arguments and results
    as `jaxlin.ops.gla`."""
    mesh = jax.sharding.get_abstract_mesh()
    n = mesh.shape[AXIS]
    B, T, H, K = q.shape
    V = v.shape[-1]
    if applies() and T % n:
        raise ValueError(f"sequence length {T} must be a multiple of the {n} devices of mesh axis '{AXIS}'")
    batch = batch_axes() or None
    tokens = P(batch, AXIS)
    # The initial state enters on the first slice: stacked with zeros for the others, it is an input of
    # that slice alone (so its gradient is that slice's).
    if initial_state is None:
        initial = None
    elif applies():
        initial = jnp.concatenate([initial_state.astype(jnp.float32)[None],
                                   jnp.zeros((n - 1, B, H, K, V), jnp.float32)])
    else:  # already this slice's: the state enters on the first
        first = jax.lax.axis_index(AXIS) == 0
        initial = jnp.where(first, initial_state.astype(jnp.float32), 0.0)[None]

    def per_slice(q, k, v, g, segment_ids=None, initial=None):
        i = jax.lax.axis_index(AXIS)
        o, local_state = local_op(q, k, v, g, segment_ids=segment_ids)
        if segment_ids is None:
            before_reset = jnp.ones(q.shape[:2], bool)
        else:
            # Documents: a reset before the slice's first token where it starts another document than the
            # previous slice's last token.
            last_ids = jax.lax.all_gather(segment_ids[:, -1], AXIS)  # [n, B]
            starts_new = (i > 0) & (segment_ids[:, 0] != last_ids[jnp.maximum(i - 1, 0)])
            change = jnp.concatenate([starts_new[:, None], segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
            before_reset = jnp.cumsum(change, axis=1) == 0  # [B, T/n]: the entering state reaches t
        g32 = g.astype(jnp.float32)
        decay_in = jnp.exp(jnp.cumsum(g32, axis=1))  # [B, T/n, H, K]: slice start .. t
        through = before_reset[:, -1][:, None, None]
        slice_decay = jnp.where(through, decay_in[:, -1], 0.0)  # [B, H, K]

        states = jax.lax.all_gather(local_state.astype(jnp.float32), AXIS)  # [n, B, H, K, V]
        decays = jax.lax.all_gather(slice_decay, AXIS)  # [n, B, H, K]
        entering = [jnp.zeros_like(states[0]) if initial is None else jax.lax.all_gather(initial[0], AXIS)[0]]
        for j in range(n):
            entering.append(decays[j][..., None] * entering[-1] + states[j])
        entering = jnp.stack(entering)  # [n + 1, B, H, K, V]: before slice j, and after the last one
        s_in = entering[i]
        q_dec = scale * q.astype(jnp.float32) * decay_in * before_reset[..., None, None]
        o = o.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", q_dec, s_in,
                                               precision=jax.lax.Precision.HIGHEST)
        return o.astype(v.dtype), entering[-1][None]

    # check_vma=False (in _per_device): Pallas kernels' outputs carry no varying-axes annotation. Every
    # slice computes the final state; only the last slice's copy is returned (so its gradient enters once);
    # inside `shard_map` over `sequence` each device returns its own copy.
    o, final = _per_device(per_slice, (q, k, v, g, segment_ids, initial), (tokens,) * 5 + (P(AXIS, batch),),
                           (tokens, P(AXIS, batch)))
    return o, (final[-1] if output_final_state else None)


def causal_conv(conv, x, kernel, segment_ids, width: int):
    """`conv(x, past, kernel, past_ids, segment_ids)` on each device's slice of x [B, T, C] (split over
    `sequence`), with `past` the previous slice's last width - 1 inputs and `past_ids` their segment ids
    (zeros on the first slice): a halo sent one device on (`ppermute`), whatever the length."""
    n = jax.sharding.get_abstract_mesh().shape[AXIS]
    B, T, _ = x.shape
    if T // (n if applies() else 1) < width - 1 or (applies() and T % n):
        raise ValueError(f"sequence length {T} must be a multiple of the {n} devices of mesh axis '{AXIS}', "
                         f"with at least {width - 1} tokens each")
    batch = batch_axes() or None
    tokens = P(batch, AXIS)
    if segment_ids is None:
        segment_ids = jnp.zeros((B, T), jnp.int32)
    forward = [(j, j + 1) for j in range(n - 1)]

    def per_slice(x, kernel, segment_ids):
        past = jax.lax.ppermute(x[:, x.shape[1] - (width - 1):], AXIS, forward)
        past_ids = jax.lax.ppermute(segment_ids[:, segment_ids.shape[1] - (width - 1):], AXIS, forward)
        return conv(x, past, kernel, past_ids, segment_ids)

    return _per_device(per_slice, (x, kernel, segment_ids), (tokens, P(), tokens), tokens)
