"""Token-by-token recurrences: the numerical oracle for the chunked and Pallas forms.

Inputs are assumed already validated (see ``checks``) and ``scale`` is explicit.
Everything is computed in float32 at HIGHEST matmul precision, whatever the input
dtype; only the output is cast back to ``v.dtype``.
"""

import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


def segment_resets(segment_ids, batch, length):
    """[B, T] bool: True where the state restarts from zero before the token.

    Token 0 never resets (it has no previous token), so ``initial_state`` feeds it.
    """
    if segment_ids is None:
        return jnp.zeros((batch, length), bool)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((batch, 1), bool), change], axis=1)


def _scan(step, q, k, v, decay, beta, *, scale, initial_state, output_final_state, segment_ids):
    """Shared driver: time-major scan of ``step(S, k, v, beta) -> S_new`` over decayed states.

    ``decay`` is the log gate broadcastable to ``[B, T, H, K]`` (already expanded by the
    caller). The reset, decay and readout are identical for the three ops; only the
    write rule (``step``) differs.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    reset = segment_resets(segment_ids, B, T)
    S0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else f32(initial_state)
    # time-major for lax.scan
    xs = (
        jnp.moveaxis(f32(q), 1, 0),
        jnp.moveaxis(f32(k), 1, 0),
        jnp.moveaxis(f32(v), 1, 0),
        jnp.moveaxis(f32(decay), 1, 0),
        jnp.moveaxis(f32(beta), 1, 0),
        jnp.moveaxis(reset, 1, 0),
    )

    def body(S, x):
        q_t, k_t, v_t, g_t, b_t, r_t = x
        S = jnp.where(r_t[:, None, None, None], 0.0, S)
        S = jnp.exp(g_t)[..., None] * S
        S = step(S, k_t, v_t, b_t)
        o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, S, precision=_HI)
        return S, o_t

    S, o = lax.scan(body, S0, xs)
    o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
    return o, (S if output_final_state else None)


def _gla_write(S, k_t, v_t, _):
    return S + k_t[..., :, None] * v_t[..., None, :]


def _delta_write(S, k_t, v_t, beta_t):
    u = beta_t[..., None] * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, S, precision=_HI))
    return S + k_t[..., :, None] * u[..., None, :]


def gla_reference(q, k, v, g, *, scale, initial_state=None, output_final_state=False, segment_ids=None):
    """``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``."""
    beta = jnp.ones(q.shape[:3], jnp.float32)  # unused by the GLA write
    return _scan(_gla_write, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, segment_ids=segment_ids)


def delta_rule_reference(q, k, v, beta, *, scale, initial_state=None, output_final_state=False,
                         segment_ids=None):
    """``S_t = S_{t-1} + k_t u_t^T`` with ``u_t = beta_t (v_t - S_{t-1}^T k_t)``."""
    g = jnp.zeros(q.shape[:3] + (1,), jnp.float32)
    return _scan(_delta_write, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, segment_ids=segment_ids)


def gated_delta_rule_reference(q, k, v, g, beta, *, scale, initial_state=None, output_final_state=False,
                               segment_ids=None):
    """The delta rule applied to ``exp(g_t) S_{t-1}``; ``g`` is ``[B, T, H]``."""
    return _scan(_delta_write, q, k, v, g[..., None], beta, scale=scale, initial_state=initial_state,
                 output_final_state=output_final_state, segment_ids=segment_ids)
