"""Which implementation runs: the table of ops and their kernels, and every ``auto`` rule, in one place.

Linear attention (``jaxlin.ops.gla``, ``delta_rule``, ``gated_delta_rule``) takes ``impl``:

- ``"reference"``: the token-by-token ``lax.scan`` (the oracle, ``reference.py``);
- ``"chunked"``: chunk-parallel plain JAX (``chunked.py``);
- ``"pallas"``: the kernels of ``LINEAR_ATTENTION``, Mosaic GPU where it supports the call (bf16, its head
  dims: 1.5-2x the Triton kernels on an H200), Triton otherwise; ``"pallas:mosaic"`` and ``"pallas:triton"``
  pin the backend. Off the GPU the kernels run in interpret mode;
- ``"auto"``: on GPU ``"pallas"`` where the kernels support the call, else ``"chunked"``. On CPU the token
  scan wins below one chunk (T < 64) and the chunked form from T = 64 on (1.2-7x under autodiff at
  T = 512-2048, 2 cores, K = V = 64), so ``auto`` picks by T. One token takes the token scan everywhere:
  the chunked forms would pad it to a whole chunk (the op itself; a layer's decoding step may take
  ``kernels.decode_step`` instead, below).

The single-device kernels (the MLP's fused GELU products, the short convs and gated RMSNorm, the blocks'
LayerNorm) take ``ModelConfig.mlp_impl``, ``elementwise_impl`` and ``layer_norm_impl``: ``"xla"``, ``"pallas"``
(interpret mode off the GPU; refused under a mesh of several devices, since XLA cannot partition them), or
``"auto"``: the kernel on one GPU where it supports the call. The MLP's ``auto`` stays on XLA under remat
``"dots"``, whose memory budget has no room for the fused forward's stored ``gelu(h)`` (its one-row decoding
kernel, below, has no backward and follows ``mlp_impl`` itself).

A recurrent layer's decoding step (one token continuing a state, no segment ids) runs everything between its
input and output products in ``kernels.decode_step`` where the kernel supports the layer, on one device, for
``"auto"`` on a GPU and for the ``"pallas"`` impls anywhere (``"pallas:mosaic"`` too: the step has a Triton
kernel only); otherwise the layer's own ops (the token scan). On an H100 the kernel took GPT-2 Medium's
batch-1 GLA step from 1.168 to 0.910 ms, and its compiled checks (``scripts/gpu_check.sh decode-tests``) passed
there in float32 and bf16 (docs/generation.md). A one-row decoding step
runs each block's second LayerNorm and MLP in ``kernels.decode_mlp`` under the MLP's impl (``auto`` on one
GPU): at one row XLA's products are reductions, and the kernel took softmax's batch-1 step from 1.275 to
0.974 ms on an H100 (GPT-2 Medium's width; the kernel takes power-of-two widths up to 1024).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

import kernels.delta
import kernels.gla
from kernels import decode_mlp, decode_step, gated_norm, gelu_matmul, layer_norm

from . import chunked, context_parallel, reference
from .mesh_axes import batch_axes

LINEAR_ATTENTION_IMPLS = ("auto", "reference", "chunked", "pallas", "pallas:mosaic", "pallas:triton")
KERNEL_IMPLS = ("auto", "xla", "pallas")


def _delta_rule_pallas(q, k, v, beta, **options):
    return kernels.delta.delta_pallas(q, k, v, None, beta, **options)


def _delta_rule_mosaic_supports(q, k, v, beta):
    return kernels.delta.mosaic_supports(q, k, v)


def _gated_delta_rule_mosaic_supports(q, k, v, g, beta):
    return kernels.delta.mosaic_supports(q, k, v)


@dataclasses.dataclass(frozen=True)
class LinearAttention:
    """One op's implementations, each called with the op's positional arrays and ``scale``,
    ``initial_state``, ``output_final_state``, ``segment_ids``; the kernel also with ``interpret`` and
    ``backend``. ``supports`` says which calls the kernel handles, ``mosaic_supports`` which of those the
    Mosaic GPU backend does (both take the positional arrays)."""

    reference: Callable
    chunked: Callable
    pallas: Callable
    supports: Callable
    mosaic_supports: Callable


LINEAR_ATTENTION = {
    "gla": LinearAttention(reference.gla_reference, chunked.gla_chunked, kernels.gla.gla_pallas,
                           kernels.gla.supports, kernels.gla.mosaic_supports),
    "delta_rule": LinearAttention(reference.delta_rule_reference, chunked.delta_rule_chunked, _delta_rule_pallas,
                                  kernels.delta.supports, _delta_rule_mosaic_supports),
    "gated_delta_rule": LinearAttention(reference.gated_delta_rule_reference, chunked.gated_delta_rule_chunked,
                                        kernels.delta.delta_pallas, kernels.delta.supports,
                                        _gated_delta_rule_mosaic_supports),
}


def pallas_backend(op: str, args) -> str:
    """The kernels' backend that ``impl="pallas"`` takes for these arrays: "mosaic" where it applies."""
    return "mosaic" if LINEAR_ATTENTION[op].mosaic_supports(*args) else "triton"


def linear_attention(op: str, impl: str, args: tuple, options: dict):
    """Runs ``op`` by ``impl`` (see the module's docstring): ``(o, final_state or None)``."""
    if op != "gla" and context_parallel.split():
        raise NotImplementedError(f"{op}: sequences split over mesh axis '{context_parallel.AXIS}' are supported "
                                  f"for GLA layers only; set mesh.sequence=1")
    table = LINEAR_ATTENTION[op]
    if impl == "auto":
        if jax.default_backend() == "gpu" and args[0].shape[1] > 1:
            impl = "pallas" if table.supports(*args) else "chunked"
        else:
            impl = "reference" if args[0].shape[1] < chunked.CHUNK else "chunked"
    if impl == "reference":
        return table.reference(*args, **options)
    if impl == "chunked":
        return table.chunked(*args, **options)
    backend = impl.partition(":")[2] or pallas_backend(op, args)
    return _per_shard(table.pallas, args, options, interpret=jax.default_backend() != "gpu", backend=backend)


def _per_shard(fn, args, options, **static):
    """Calls a kernel on each device's share of the batch when a mesh is current.

    XLA cannot partition a Pallas custom call (it would gather the whole batch onto every device), so
    under `jax.set_mesh` the call runs inside `shard_map`, with the batch axis split over the mesh axes that
    split it and are not manual yet (`mesh_axes.batch_axes`): the recurrence never mixes batch rows, so no
    communication is needed.
    """
    axes = batch_axes()
    arrays = {"initial_state": options["initial_state"], "segment_ids": options["segment_ids"]}
    rest = {k: v for k, v in options.items() if k not in arrays} | static
    if not axes:
        return fn(*args, **arrays, **rest)
    batch = P(axes)

    def local(args, arrays):
        return fn(*args, **arrays, **rest)

    specs = jax.tree.map(lambda _: batch, (args, arrays))
    out_specs = (batch, batch if options["output_final_state"] else None)
    # check_vma=False: pallas_call output shapes carry no varying-axes annotation.
    return jax.shard_map(local, in_specs=specs, out_specs=out_specs, axis_names=set(axes),
                         check_vma=False)(args, arrays)


def on_one_gpu() -> bool:
    """Whether the code runs on one GPU: where the single-device kernels apply by default."""
    return jax.default_backend() == "gpu" and jax.sharding.get_abstract_mesh().size <= 1


def require_one_device(what: str, fix: str) -> None:
    """Refuses a single-device kernel asked for under a mesh of several devices, naming the config fix."""
    devices = jax.sharding.get_abstract_mesh().size
    if devices > 1:
        raise ValueError(f"{what}: one device only, not partitioned over a mesh of {devices}; use {fix}")


def _kernel_applies(impl: str, what: str, key: str) -> bool:
    """``impl``, the value of config field ``key``: "pallas" (refused under a mesh of several devices), or
    "auto" on one GPU."""
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"{key} must be one of {KERNEL_IMPLS}, got {impl!r}")
    if impl == "pallas":
        require_one_device(what, f"{key}='auto' or 'xla'")
        return True
    return impl == "auto" and on_one_gpu()


def mlp_impl(impl: str, remat: str, matmul_precision: str = "bf16") -> str:
    """The MLP's impl under the model's remat policy and matmul precision: ``auto`` is ``xla`` under
    ``"dots"`` and under FP8 products (the fused kernel has no FP8 path)."""
    return "xla" if impl == "auto" and (remat == "dots" or matmul_precision == "fp8") else impl


def fused_mlp_applies(impl: str, x, w_fc) -> bool:
    """Whether the MLP runs its GELU in the products' epilogues (``kernels.gelu_matmul``): "pallas", or
    "auto" on one GPU with bf16 operands whose shapes the tiles divide."""
    if not _kernel_applies(impl, "the fused GELU MLP", "model.mlp_impl"):
        return False
    return impl == "pallas" or gelu_matmul.supports(x, w_fc)


def decode_mlp_applies(impl: str, x, hidden_units: int, *, decoding: bool) -> bool:
    """Whether a block's second LayerNorm and MLP on ``x [B, T, D]`` run in ``kernels.decode_mlp``: a decoding
    step (``decoding``, T = 1) of one row (B = 1), where XLA would run the products as slow reductions (at two
    rows XLA's GEMMs were as fast as the kernel), under the MLP's ``impl``."""
    if not decoding or x.shape[1] != 1 or not _kernel_applies(impl, "the decoding MLP kernel", "model.mlp_impl"):
        return False
    return decode_mlp.supports(x[:, 0], hidden_units)


def elementwise_kernels_apply(impl: str = "auto") -> bool:
    """Whether the short convs run on ``kernels.short_conv`` (and, for the rows it supports, the gated norm on
    ``kernels.gated_norm``)."""
    return _kernel_applies(impl, "the element-wise Pallas kernels", "model.elementwise_impl")


def gated_norm_applies(impl: str, rows) -> bool:
    """Whether the gated RMSNorm of ``rows [N, D]`` runs on ``kernels.gated_norm``."""
    return elementwise_kernels_apply(impl) and gated_norm.supports(rows)


def layer_norm_applies(x, impl: str) -> bool:
    """Whether a block's LayerNorm and residual add run on ``kernels.layer_norm`` (``ops.norm.residual_layer_norm``)
    for ``x [..., D]``; other rows take Flax's LayerNorm."""
    if not _kernel_applies(impl, "the LayerNorm kernel", "model.layer_norm_impl"):
        return False
    return layer_norm.supports(x.reshape(-1, x.shape[-1]))


def decode_kernel_applies(impl: str, step: decode_step.Step, x, *, segment_ids, state, return_state) -> bool:
    """Whether a recurrent layer's call on ``x [B, T, D]`` is a decoding step that ``kernels.decode_step`` runs
    (see the module's docstring); ``step`` describes the layer."""
    if x.shape[1] != 1 or segment_ids is not None or not return_state or state.get("recurrent") is None:
        return False
    if not decode_step.supports(step) or jax.sharding.get_abstract_mesh().size > 1:
        return False
    return impl.startswith("pallas") or (impl == "auto" and on_one_gpu())
