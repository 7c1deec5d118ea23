"""Chunk-parallel forms in plain JAX (differentiated by autodiff).

The sequence is cut into chunks of ``CHUNK`` tokens. Inside a chunk the token-token
interactions are dense ``[C, C]`` matrices computed in parallel; a sequential
``lax.scan`` over chunks carries the float32 state ``[K, V]`` between them.

Decays: every exponent is a sum of log gates over a token range, built by (masked)
cumulative sums and never as a difference ``b_t - b_s`` of two cumulative sums. Gates are
<= 0, so each ``exp`` lies in [0, 1] however negative they are (no overflow, no inf to
meet a zero mask, so finite gradients). And autodiff then sends each pair's gate gradient
only to the gates inside its range: a difference of cumsums would route it as +c and -c
through the reverse cumsum, leaving float32 rounding of O(c) where the true gate gradient
is O(exp(g)) c -- all noise for gates of -25 per token.

Segments: a reset before token t means no contribution crosses it. With ``doc`` = the
number of resets up to each token, a pair (t, s) interacts iff ``doc_t == doc_s``; the
state entering a chunk reaches token t iff ``doc_t`` equals the document of the token
before the chunk; token s writes into the state leaving the chunk iff ``doc_s`` equals
the chunk's last document. Resets are thus masks, never -inf gates.
"""

import math

import jax.numpy as jnp
from jax import lax

from .reference import segment_resets

CHUNK = 64
SUB = 16  # GLA secondary chunk: the [SUB, SUB, K] exact-decay tensor bounds memory


def _dot(eq, a, b, dtype):
    """einsum in ``dtype`` with float32 accumulation."""
    return jnp.einsum(eq, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


class _Chunks:
    """Padding, chunk layout and segment masks for one call.

    Chunked arrays are ``[B, H, N, C, ...]``: N chunks of C tokens. Padding tokens carry
    zero k/v/beta/gate so they leave the state untouched, and continue the last document.
    """

    def __init__(self, segment_ids, B, T):
        # short sequences use one smaller chunk (a multiple of SUB) instead of padding to 64
        self.C = min(CHUNK, SUB * math.ceil(T / SUB))
        self.N = math.ceil(T / self.C)
        self.T, self.pad = T, self.N * self.C - T
        reset = segment_resets(segment_ids, B, T)
        doc = jnp.cumsum(reset, axis=1, dtype=jnp.int32)
        doc = jnp.pad(doc, ((0, 0), (0, self.pad)), mode="edge")
        prev = jnp.pad(doc[:, :-1], ((0, 0), (1, 0)))  # document of the previous token
        doc = doc.reshape(B, 1, self.N, self.C)  # broadcasts over heads
        entry = prev.reshape(B, 1, self.N, self.C)[..., :1]
        self.same = doc[..., :, None] == doc[..., None, :]  # [B,1,N,C,C]
        self.from_entry = doc == entry  # [B,1,N,C] state entering the chunk reaches t
        self.to_exit = doc == doc[..., -1:]  # [B,1,N,C] token s reaches the state leaving the chunk
        self.through = self.from_entry[..., -1:]  # [B,1,N,1] entering state survives the chunk

    def split(self, x):
        """``[B, T, H, ...]`` -> ``[B, H, N, C, ...]``."""
        x = jnp.pad(x, ((0, 0), (0, self.pad)) + ((0, 0),) * (x.ndim - 2))
        x = x.reshape(x.shape[0], self.N, self.C, *x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    def merge(self, x):
        """``[B, H, N, C, V]`` -> ``[B, T, H, V]``."""
        B, H, N, C, V = x.shape
        return jnp.moveaxis(x, 1, 3).reshape(B, N * C, H, V)[:, : self.T]


def _scan_chunks(S0, q_dec, a_qv, k_dec, v, decay, w=None):
    """Carry the state across chunks.

    Per chunk: ``v' = v - w S`` (delta rules; ``v' = v`` for GLA),
    ``o = q_dec S + a_qv v'``, ``S <- decay * S + k_dec^T v'``.
    ``decay`` is ``[..., K]`` (GLA) or ``[..., 1]`` (scalar gates) and includes the reset mask.
    """
    xs = [jnp.moveaxis(x, 2, 0) for x in (q_dec, a_qv, k_dec, v, decay)]
    if w is not None:
        xs.append(jnp.moveaxis(w, 2, 0))

    def body(S, x):
        qd, a, kd, vc, d = x[:5]
        if w is not None:
            vc = vc - jnp.einsum("bhck,bhkv->bhcv", x[5], S)
        o = jnp.einsum("bhck,bhkv->bhcv", qd, S) + jnp.einsum("bhcs,bhsv->bhcv", a, vc)
        S = d[..., :, None] * S + jnp.einsum("bhck,bhcv->bhkv", kd, vc)
        return S, o

    S, o = lax.scan(body, S0, xs)
    return S, jnp.moveaxis(o, 0, 2)


def _initial(initial_state, B, H, K, V):
    if initial_state is None:
        return jnp.zeros((B, H, K, V), jnp.float32)
    return initial_state.astype(jnp.float32)


def _range_sums(x):
    """``[..., L, D] -> [..., L, L, D]``: ``out[t, s] = sum_{s < j <= t} x_j`` (0 when t <= s)."""
    L = x.shape[-2]
    later = (jnp.arange(L)[:, None] > jnp.arange(L)[None, :])[:, :, None]  # [j, s]
    return jnp.cumsum(jnp.where(later, x[..., :, None, :], 0.0), axis=-3)


def _suffix_sums(x):
    """``out_s = sum_{j > s} x_j`` along axis -2."""
    shifted = jnp.pad(x[..., 1:, :], [(0, 0)] * (x.ndim - 2) + [(0, 1), (0, 0)])
    return lax.cumsum(shifted, axis=x.ndim - 2, reverse=True)


def _gla_scores(q, k, g, dtype):
    """``A[t, s] = sum_k q_tk k_sk exp(sum_{s < j <= t} g_jk)`` for s <= t inside each chunk.

    Diagonal SUB x SUB blocks use the exact per-channel decay (a ``[SUB, SUB, K]`` tensor).
    An off-diagonal block (row sub-chunk i, earlier column s) splits the decay at the start
    of sub-chunk i: ``exp(sum_{start_i <= j <= t} g) * exp(sum_{s < j < start_i} g)``,
    both factors <= 1, so it becomes one matmul that cannot overflow.
    """
    *lead, C, K = q.shape
    n = C // SUB
    qs, ks, gs = (x.reshape(*lead, n, SUB, K) for x in (q, k, g))

    causal = jnp.tril(jnp.ones((SUB, SUB), bool))
    diag = jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * jnp.exp(_range_sums(gs)), axis=-1)
    diag = jnp.where(causal, diag, 0.0)  # [.., n, SUB, SUB]

    before = jnp.arange(C)[None, :] < SUB * jnp.arange(n)[:, None]  # [n, C]: token precedes sub-chunk i
    q_off = qs * jnp.exp(jnp.cumsum(gs, axis=-2))
    k_gap = _suffix_sums(jnp.where(before[..., None], g[..., None, :, :], 0.0))  # [.., n, C, K]
    k_off = k[..., None, :, :] * jnp.exp(k_gap)
    off = jnp.where(before[:, None, :], _dot("...itk,...isk->...its", q_off, k_off, dtype), 0.0)

    blocks = diag[..., :, :, None, :] * jnp.eye(n, dtype=diag.dtype)[:, None, :, None]
    return off.reshape(*lead, C, C) + blocks.reshape(*lead, C, C)


def gla_chunked(q, k, v, g, *, scale, initial_state=None, output_final_state=False, segment_ids=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = jnp.float32
    ch = _Chunks(segment_ids, B, T)
    qc, kc, vc = ch.split(q), ch.split(k), ch.split(v)
    gc = ch.split(g.astype(f32))
    upto = jnp.cumsum(gc, axis=-2)  # chunk start .. t
    after = _suffix_sums(gc)  # t+1 .. chunk end

    a_qv = jnp.where(ch.same, scale * _gla_scores(qc.astype(f32), kc.astype(f32), gc, q.dtype), 0.0)
    q_dec = scale * qc * jnp.exp(upto) * ch.from_entry[..., None]
    k_dec = kc * jnp.exp(after) * ch.to_exit[..., None]
    decay = jnp.exp(upto[..., -1, :]) * ch.through

    S, o = _scan_chunks(_initial(initial_state, B, H, K, V), q_dec, a_qv, k_dec, vc.astype(f32), decay)
    return ch.merge(o).astype(v.dtype), (S if output_final_state else None)


def _delta_chunked(q, k, v, g, beta, *, scale, initial_state, output_final_state, segment_ids):
    """WY/UT form shared by both delta rules; ``g`` is ``[B, T, H]``, or None for the ungated rule.

    In chunk coordinates, with ``S0`` the entering state and ``d(t, s) = exp(sum_{s<j<=t} g_j)``,
    ``u_t = beta_t (v_t - d(t, -1) S0^T k_t - sum_{s<t} d(t, s) (k_t.k_s) u_s)``, i.e.
    ``(I + A) U = diag(beta) V - diag(beta d(., -1)) K S0`` with ``A`` strictly lower. One
    triangular solve gives ``W = (I+A)^{-1} diag(beta d(., -1)) K`` and
    ``U' = (I+A)^{-1} diag(beta) V``, leaving ``U = U' - W S0`` for the sequential scan.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = jnp.float32
    ch = _Chunks(segment_ids, B, T)
    qc, kc, vc = ch.split(q), ch.split(k), ch.split(v)
    bt = ch.split(beta.astype(f32))  # [B,H,N,C]
    if g is None:  # no decay: every factor is 1 (cumsums of a zeros array cost XLA long constant folds)
        upto = after = jnp.ones_like(bt)
        decay_ts = 1.0
    else:
        gc = ch.split(g.astype(f32))[..., None]  # trailing unit "channel" for the range-sum helpers
        upto = jnp.exp(jnp.cumsum(gc, axis=-2)[..., 0])
        after = jnp.exp(_suffix_sums(gc)[..., 0])
        decay_ts = jnp.exp(_range_sums(gc)[..., 0])  # [B,H,N,C,C]

    lower = jnp.tril(jnp.ones((ch.C, ch.C), bool))
    strict = jnp.tril(jnp.ones((ch.C, ch.C), bool), -1)
    kk = _dot("...tk,...sk->...ts", kc, kc, q.dtype)
    a = jnp.where(strict & ch.same, bt[..., :, None] * kk * decay_ts, 0.0)
    k_in = (bt * upto * ch.from_entry)[..., None] * kc
    rhs = jnp.concatenate([k_in, bt[..., None] * vc], axis=-1)
    eye = jnp.eye(ch.C, dtype=f32)
    wu = lax.linalg.triangular_solve(eye + a, rhs, left_side=True, lower=True, unit_diagonal=True)
    w, u = wu[..., :K], wu[..., K:]

    qk = _dot("...tk,...sk->...ts", qc, kc, q.dtype)
    a_qv = jnp.where(lower & ch.same, scale * qk * decay_ts, 0.0)
    q_dec = scale * qc * (upto * ch.from_entry)[..., None]
    k_dec = kc * (after * ch.to_exit)[..., None]
    decay = upto[..., -1:] * ch.through

    S, o = _scan_chunks(_initial(initial_state, B, H, K, V), q_dec, a_qv, k_dec, u, decay, w)
    return ch.merge(o).astype(v.dtype), (S if output_final_state else None)


def delta_rule_chunked(q, k, v, beta, *, scale, initial_state=None, output_final_state=False, segment_ids=None):
    return _delta_chunked(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, segment_ids=segment_ids)


def gated_delta_rule_chunked(q, k, v, g, beta, *, scale, initial_state=None, output_final_state=False,
                             segment_ids=None):
    return _delta_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, segment_ids=segment_ids)
