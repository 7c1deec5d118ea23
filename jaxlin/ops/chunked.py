"""Chunk-parallel forms in plain JAX (differentiated by autodiff).

The sequence is cut into chunks of ``CHUNK`` tokens. Inside a chunk the token-token
interactions are dense ``[C, C]`` matrices computed in parallel; a sequential
``lax.scan`` over chunks carries the float32 state ``[K, V]`` between them.

Overflow: with cumulative log gates ``b`` (non-increasing because every gate is <= 0)
every exponential below has an argument ``b_t - b_s`` with ``s <= t`` (or a value
masked to 0 *before* ``exp``), so it is <= 0 and ``exp`` lies in [0, 1] however negative
the gates are. Masked entries never reach ``exp`` with a large argument, so no inf ever
meets a zero mask and gradients stay finite.

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


def _gla_scores(q, k, b, dtype):
    """``A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk)`` for s <= t inside each chunk (unmasked by segment).

    Diagonal SUB x SUB blocks use the exact per-channel decay. An off-diagonal block
    (row sub-chunk i, earlier column s) factors the decay through ``r_i``, the cumulative
    gate just before sub-chunk i: ``exp(b_t - r_i) * exp(r_i - b_s)``, both factors <= 1
    since b is non-increasing, so it becomes one matmul without overflow.
    """
    *lead, C, K = q.shape
    n = C // SUB
    qs, ks, bs = (x.reshape(*lead, n, SUB, K) for x in (q, k, b))

    causal = jnp.tril(jnp.ones((SUB, SUB), bool))[..., None]
    diff = jnp.where(causal, bs[..., :, None, :] - bs[..., None, :, :], 0.0)
    diag = jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * jnp.exp(diff), axis=-1)
    diag = jnp.where(causal[..., 0], diag, 0.0)  # [.., n, SUB, SUB]

    r = jnp.concatenate([jnp.zeros_like(bs[..., :1, 0, :]), bs[..., :-1, -1, :]], axis=-2)  # [.., n, K]
    before = jnp.arange(C)[None, :] < SUB * jnp.arange(n)[:, None]  # [n, C]: column precedes sub-chunk
    q_off = qs * jnp.exp(bs - r[..., None, :])
    k_off = k[..., None, :, :] * jnp.exp(jnp.where(before[..., None], r[..., None, :] - b[..., None, :, :], 0.0))
    off = jnp.where(before[:, None, :], _dot("...itk,...isk->...its", q_off, k_off, dtype), 0.0)

    blocks = diag[..., :, :, None, :] * jnp.eye(n, dtype=diag.dtype)[:, None, :, None]
    return (off.reshape(*lead, C, C) + blocks.reshape(*lead, C, C))


def gla_chunked(q, k, v, g, *, scale, initial_state=None, output_final_state=False, segment_ids=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    ch = _Chunks(segment_ids, B, T)
    qc, kc, vc = ch.split(q), ch.split(k), ch.split(v)
    b = jnp.cumsum(ch.split(g.astype(jnp.float32)), axis=-2)  # within-chunk cumulative log gate
    b_last = b[..., -1:, :]

    a_qv = jnp.where(ch.same, scale * _gla_scores(qc.astype(jnp.float32), kc.astype(jnp.float32), b, q.dtype), 0.0)
    q_dec = scale * qc * jnp.exp(b) * ch.from_entry[..., None]
    k_dec = kc * jnp.exp(b_last - b) * ch.to_exit[..., None]
    decay = jnp.exp(b_last[..., 0, :]) * ch.through

    S, o = _scan_chunks(_initial(initial_state, B, H, K, V), q_dec, a_qv, k_dec,
                        vc.astype(jnp.float32), decay)
    return ch.merge(o).astype(v.dtype), (S if output_final_state else None)


def _delta_chunked(q, k, v, g, beta, *, scale, initial_state, output_final_state, segment_ids):
    """WY/UT form shared by both delta rules; ``g`` is ``[B, T, H]`` (zeros for the ungated rule).

    In chunk coordinates, with ``b`` the cumulative scalar gate and ``S0`` the entering state,
    ``u_t = beta_t (v_t - e^{b_t} S0^T k_t - sum_{s<t} e^{b_t - b_s} (k_t.k_s) u_s)``, i.e.
    ``(I + A) U = beta V - diag(beta e^b) K S0`` with ``A`` strictly lower. Solving once for
    ``W = (I+A)^{-1} diag(beta e^b) K`` and ``U' = (I+A)^{-1} diag(beta) V`` leaves
    ``U = U' - W S0`` for the sequential scan.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = jnp.float32
    ch = _Chunks(segment_ids, B, T)
    qc, kc, vc = ch.split(q), ch.split(k), ch.split(v)
    bt = ch.split(beta.astype(f32))  # [B,H,N,C]
    b = jnp.cumsum(ch.split(g.astype(f32)), axis=-1)
    b_last = b[..., -1:]

    lower = jnp.tril(jnp.ones((ch.C, ch.C), bool))
    strict = jnp.tril(jnp.ones((ch.C, ch.C), bool), -1)
    decay_ts = jnp.exp(jnp.where(lower, b[..., :, None] - b[..., None, :], 0.0))

    kk = _dot("...tk,...sk->...ts", kc, kc, q.dtype)
    a = jnp.where(strict & ch.same, bt[..., :, None] * kk * decay_ts, 0.0)
    eye = jnp.eye(ch.C, dtype=f32)
    k_in = (bt * jnp.exp(b) * ch.from_entry)[..., None] * kc
    rhs = jnp.concatenate([k_in, bt[..., None] * vc], axis=-1)
    wu = lax.linalg.triangular_solve(eye + a, rhs, left_side=True, lower=True, unit_diagonal=True)
    w, u = wu[..., :K], wu[..., K:]

    qk = _dot("...tk,...sk->...ts", qc, kc, q.dtype)
    a_qv = jnp.where(lower & ch.same, scale * qk * decay_ts, 0.0)
    q_dec = scale * qc * (jnp.exp(b) * ch.from_entry)[..., None]
    k_dec = kc * (jnp.exp(b_last - b) * ch.to_exit)[..., None]
    decay = jnp.exp(b_last) * ch.through

    S, o = _scan_chunks(_initial(initial_state, B, H, K, V), q_dec, a_qv, k_dec, u, decay, w)
    return ch.merge(o).astype(v.dtype), (S if output_final_state else None)


def delta_rule_chunked(q, k, v, beta, *, scale, initial_state=None, output_final_state=False, segment_ids=None):
    g = jnp.zeros(q.shape[:3], jnp.float32)
    return _delta_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, segment_ids=segment_ids)


def gated_delta_rule_chunked(q, k, v, g, beta, *, scale, initial_state=None, output_final_state=False,
                             segment_ids=None):
    return _delta_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, segment_ids=segment_ids)
