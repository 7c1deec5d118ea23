"""Argument validation shared by the public ops. Every failure is a ValueError naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np

from .dispatch import LINEAR_ATTENTION_IMPLS as IMPLS
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def _shape(name, x, rank, what):
    if x is None or not hasattr(x, "shape"):
        raise ValueError(f"{name} must be an array of shape {what}, got {type(x).__name__}")
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} ({what}), got shape {tuple(x.shape)}")
    return tuple(x.shape)


def _expect(name, got, want, what):
    if tuple(got) != tuple(want):
        raise ValueError(f"{name} must have shape {what} = {tuple(want)}, got {tuple(got)}")


def _float_dtype(name, x, allowed):
    if x.dtype not in allowed:
        names = " or ".join(str(np.dtype(d)) for d in dict.fromkeys(allowed))
        raise ValueError(f"{name} must have dtype {names}, got {x.dtype}")


def _no_positive(name, x):
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"validate=True needs concrete {name} (it syncs with the host); call it outside jit")
    if bool(jnp.any(x > 0)):
        raise ValueError(f"{name} is a log gate and must be <= 0 everywhere, got max {float(jnp.max(x))}")


def check_inputs(q, k, v, *, g=None, g_rank=None, beta=None, initial_state=None, segment_ids=None,
                 impl="auto", validate=False):
    """Validate the arguments of one op; returns ``(B, T, H, K, V)``.

    ``g_rank`` is 4 for GLA's per-channel gate ``[B,T,H,K]`` and 3 for the per-head gate
    ``[B,T,H]``; pass ``g=None`` for ops without a gate and ``beta=None`` for ops without one.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    B, T, H, K = _shape("q", q, 4, "[B, T, H, K]")
    _expect("k", _shape("k", k, 4, "[B, T, H, K]"), (B, T, H, K), "[B, T, H, K] like q")
    Bv, Tv, Hv, V = _shape("v", v, 4, "[B, T, H, V]")
    _expect("v", (Bv, Tv, Hv), (B, T, H), "[B, T, H, :] like q")
    if T < 1:
        raise ValueError(f"q must have at least one token (T >= 1), got T={T}")
    for name, d in (("K (last dim of q and k)", K), ("V (last dim of v)", V)):
        if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            raise ValueError(f"head dim {name} must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")

    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must have a floating dtype, got {q.dtype}")
    _float_dtype("k", k, (q.dtype,))
    _float_dtype("v", v, (q.dtype,))
    gate_dtypes = (jnp.dtype(jnp.float32), q.dtype)

    if g is not None:
        if g_rank == 4:
            _expect("g", _shape("g", g, 4, "[B, T, H, K]"), (B, T, H, K), "[B, T, H, K] like q")
        else:
            _expect("g", _shape("g", g, 3, "[B, T, H]"), (B, T, H), "[B, T, H]")
        _float_dtype("g", g, gate_dtypes)
        if validate:
            _no_positive("g", g)
    if beta is not None:
        _expect("beta", _shape("beta", beta, 3, "[B, T, H]"), (B, T, H), "[B, T, H]")
        _float_dtype("beta", beta, gate_dtypes)
    if initial_state is not None:
        _expect("initial_state", _shape("initial_state", initial_state, 4, "[B, H, K, V]"),
                (B, H, K, V), "[B, H, K, V]")
        if not jnp.issubdtype(initial_state.dtype, jnp.floating):
            raise ValueError(f"initial_state must have a floating dtype, got {initial_state.dtype}")
    if segment_ids is not None:
        _expect("segment_ids", _shape("segment_ids", segment_ids, 2, "[B, T]"), (B, T), "[B, T]")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")
    return B, T, H, K, V
