"""Linear-attention ops: GLA, DeltaNet and Gated DeltaNet.

Each op validates its arguments, applies the optional q/k L2 normalisation, and
dispatches to one implementation:

- ``"reference"``: token-by-token ``lax.scan`` (the oracle, ``reference.py``);
- ``"chunked"``: chunk-parallel plain JAX (``chunked.py``);
- ``"pallas"``: GPU kernels from the top-level ``kernels`` package, imported lazily:
  ``kernels.<op>.<op>_pallas(q, k, v, [g,] [beta,] scale=, initial_state=,
  output_final_state=, segment_ids=, interpret=)``. A kernel module may define
  ``supports(...)`` (same arguments, no ``interpret``) returning False for calls it
  cannot handle, so that ``"auto"`` falls back to ``"chunked"``. ``"pallas:mosaic"`` and
  ``"pallas:triton"`` pin the kernels' backend (``backend=`` of ``<op>_pallas``; ``"pallas"``
  lets the kernel pick: Mosaic GPU where it applies);
- ``"auto"``: on GPU the Pallas kernel when it exists and supports the call, else
  ``"chunked"``. On CPU (2 cores, K=V=64) the token scan wins below one chunk (T < 64)
  and the chunked form wins under autodiff from T = 64 on (1.2-7x at T = 512-2048),
  so auto picks by T.

Under a mesh with a ``sequence`` axis of several devices GLA runs context-parallel
(``context_parallel.py``): each device runs the chosen implementation on its slice of every sequence and the
devices exchange only per-head states.

All return ``(o, final_state)``: ``o`` in v's dtype ``[B, T, H, V]``, ``final_state``
float32 ``[B, H, K, V]`` when ``output_final_state`` else None.
"""

import importlib

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from . import chunked, context_parallel, reference
from .checks import batch_axes, check_inputs

__all__ = ["gla", "delta_rule", "gated_delta_rule", "l2norm", "SAVEABLE_NAMES"]

# `jax.checkpoint` names: every op's output, and the Pallas kernels' backward residuals (chunk states;
# `kernels.common.RESIDUAL_NAME`, not imported here so that jaxlin runs without the kernels package).
OUTPUT_NAME = "linear_attention_output"
RESIDUAL_NAME = "linear_attention_residual"
SAVEABLE_NAMES = (OUTPUT_NAME, RESIDUAL_NAME)

_IMPLS = {
    "gla": (reference.gla_reference, chunked.gla_chunked),
    "delta_rule": (reference.delta_rule_reference, chunked.delta_rule_chunked),
    "gated_delta_rule": (reference.gated_delta_rule_reference, chunked.gated_delta_rule_chunked),
}


def l2norm(x, eps=1e-6):
    """``x / sqrt(sum(x^2) + eps)`` over the last axis, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _pallas_module(op):
    """The kernel module for ``op``, or None when it does not exist (yet)."""
    name = f"kernels.{op}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name in ("kernels", name):
            return None
        raise  # the module exists but one of its own imports is broken: surface it


def _pallas(op, args, kwargs, backend):
    module = _pallas_module(op)
    fn = getattr(module, f"{op}_pallas", None)
    if fn is None:
        raise NotImplementedError(
            f"impl='pallas': no Pallas kernel for {op} yet (expected function {op}_pallas in module kernels.{op})")
    static = {"interpret": jax.default_backend() != "gpu"} | ({"backend": backend} if backend else {})
    return _per_shard(fn, args, kwargs, **static)


def _per_shard(fn, args, kwargs, **static):
    """Calls a kernel on each device's share of the batch when a mesh is current.

    XLA cannot partition a Pallas custom call (it would gather the whole batch onto every device), so
    under `jax.set_mesh` the call runs inside `shard_map`, with the batch axis split over the mesh axes that
    split it and are not manual yet (`checks.batch_axes`):
    the recurrence never mixes batch rows, so no communication is needed.
    """
    axes = batch_axes()
    arrays = {"initial_state": kwargs["initial_state"], "segment_ids": kwargs["segment_ids"]}
    options = {k: v for k, v in kwargs.items() if k not in arrays} | static
    if not axes:
        return fn(*args, **arrays, **options)
    batch = P(axes)

    def local(args, arrays):
        return fn(*args, **arrays, **options)

    specs = jax.tree.map(lambda _: batch, (args, arrays))
    out_specs = (batch, batch if kwargs["output_final_state"] else None)
    # check_vma=False: pallas_call output shapes carry no varying-axes annotation.
    return jax.shard_map(local, in_specs=specs, out_specs=out_specs, axis_names=set(axes),
                         check_vma=False)(args, arrays)


def _pallas_supports(op, args, kwargs):
    module = _pallas_module(op)
    if module is None or not hasattr(module, f"{op}_pallas"):
        return False
    supports = getattr(module, "supports", None)
    return supports is None or bool(supports(*args, **kwargs))


def _dispatch(op, impl, args, kwargs):
    if op != "gla" and context_parallel.split():
        raise NotImplementedError(f"{op}: sequences split over mesh axis '{context_parallel.AXIS}' are supported "
                                  f"for GLA layers only; set mesh.sequence=1")
    ref_fn, chunk_fn = _IMPLS[op]
    if impl == "auto":
        if jax.default_backend() == "gpu":
            impl = "pallas" if _pallas_supports(op, args, kwargs) else "chunked"
        else:
            impl = "reference" if args[0].shape[1] < chunked.CHUNK else "chunked"
    if impl.startswith("pallas"):
        o, final_state = _pallas(op, args, kwargs, backend=impl.partition(":")[2])
    else:
        o, final_state = (ref_fn if impl == "reference" else chunk_fn)(*args, **kwargs)
    return checkpoint_name(o, OUTPUT_NAME), final_state


def _kwargs(q, scale, initial_state, output_final_state, segment_ids):
    return dict(scale=q.shape[-1] ** -0.5 if scale is None else scale, initial_state=initial_state,
                output_final_state=output_final_state, segment_ids=segment_ids)


def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
        impl="auto", validate=False):
    """Gated linear attention: ``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    q, k, g ``[B, T, H, K]`` (g the log forget gate, <= 0), v ``[B, T, H, V]``.
    """
    check_inputs(q, k, v, g=g, g_rank=4, initial_state=initial_state, segment_ids=segment_ids,
                 impl=impl, validate=validate)
    kwargs = _kwargs(q, scale, initial_state, output_final_state, segment_ids)
    if context_parallel.split():  # sequences split over devices: each runs this op on its slice
        def local(q, k, v, g, segment_ids):
            return _dispatch("gla", impl, (q, k, v, g), _kwargs(q, kwargs["scale"], None, True, segment_ids))

        o, final_state = context_parallel.gla(local, q, k, v, g, **kwargs)
        return checkpoint_name(o, OUTPUT_NAME), final_state
    return _dispatch("gla", impl, (q, k, v, g), kwargs)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               segment_ids=None, use_qk_l2norm=False, impl="auto", validate=False):
    """DeltaNet: ``u_t = beta_t (v_t - S_{t-1}^T k_t)``, ``S_t = S_{t-1} + k_t u_t^T``, ``o_t = scale S_t^T q_t``.

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]``.
    """
    check_inputs(q, k, v, beta=beta, initial_state=initial_state, segment_ids=segment_ids,
                 impl=impl, validate=validate)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    kwargs = _kwargs(q, scale, initial_state, output_final_state, segment_ids)
    return _dispatch("delta_rule", impl, (q, k, v, beta), kwargs)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     segment_ids=None, use_qk_l2norm=False, impl="auto", validate=False):
    """Gated DeltaNet: the delta rule applied to ``S' = exp(g_t) S_{t-1}``.

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g (log gate, <= 0) and beta ``[B, T, H]``.
    """
    check_inputs(q, k, v, g=g, g_rank=3, beta=beta, initial_state=initial_state,
                 segment_ids=segment_ids, impl=impl, validate=validate)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    kwargs = _kwargs(q, scale, initial_state, output_final_state, segment_ids)
    return _dispatch("gated_delta_rule", impl, (q, k, v, g, beta), kwargs)
