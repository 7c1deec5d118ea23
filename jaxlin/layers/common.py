"""Pieces shared by the attention layers: projections, short causal convolution, gated RMSNorm."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlin import ops
from jaxlin.layers import fp8
from jaxlin.ops import conv, dispatch, norm

INIT_STD = 0.02  # nanoGPT's initialisation for every Linear and Embedding
# Element-wise results that feed a matrix product or a recurrence kernel (norm outputs, the MLP activation,
# the short convs' outputs, GLA's forget gate): the "dots_and_activations" remat policy (jaxlin.model)
# stores them instead of recomputing.
ACTIVATION_NAME = "activation"


def activation(x):
    return checkpoint_name(x, ACTIVATION_NAME)


def linear(d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs, std: float = INIT_STD, bias: bool = False) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros, rngs=rngs,
    )


class ShortConv(nnx.Module):
    """The parameter of FLA's ShortConvolution (depthwise, no bias, SiLU after), stored as [width, channels].

    PyTorch's default Conv1d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = width for depthwise.
    """

    def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs):
        bound = width ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound))


class GatedRMSNorm(nnx.Module):
    """Per-head RMSNorm over the value dim, optionally gated by swish(gate) (FLA's FusedRMSNormGated)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, impl: str = "auto"):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps, self.impl = eps, impl

    def __call__(self, x, gate=None):
        return activation(norm.gated_rms_norm(x, self.weight[...], gate, eps=self.eps, impl=self.impl))


def split_heads(x, n_head: int):
    return x.reshape(*x.shape[:-1], n_head, x.shape[-1] // n_head)


def merge_heads(x):
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class QKVConv(nnx.Module):
    """The three short convolutions FLA puts on q, k and v; state carries each one's cache under "q",
    "k" and "v". They read the q|k|v columns of the layer's joined input projection, and each writes its
    own output, which the kernels take as they are. ``impl``: ``jaxlin.ops.conv.conv_and_split``'s, the
    path without a cache (training, scoring)."""

    def __init__(self, key_dim: int, value_dim: int, width: int, *, impl: str = "auto", rngs: nnx.Rngs):
        self.q = ShortConv(key_dim, width, rngs=rngs)
        self.k = ShortConv(key_dim, width, rngs=rngs)
        self.v = ShortConv(value_dim, width, rngs=rngs)
        self.width, self.impl = width, impl

    def __call__(self, y, rest_widths, *, segment_ids=None, cache=None, return_cache=False):
        """y [B, T, 2 key_dim + value_dim + sum(rest_widths)] -> ((q, k, v), y's other columns split by
        rest_widths, the new cache)."""
        kernels = [c.kernel[...] for c in (self.q, self.k, self.v)]
        if cache is None and not return_cache:
            outputs, rest = conv.conv_and_split(y, kernels, rest_widths, segment_ids=segment_ids, impl=self.impl)
            return tuple(activation(o) for o in outputs), rest, {}
        inputs = conv.split_channels(y, [k.shape[1] for k in kernels] + list(rest_widths))
        outputs, new_cache = [], {}
        for name, kernel, x in zip("qkv", kernels, inputs):
            out, new_cache[name] = conv.causal_conv(x, kernel, segment_ids=segment_ids,
                                                    cache=cache[name] if cache else None, return_cache=return_cache)
            outputs.append(activation(out))
        return tuple(outputs), tuple(inputs[len(kernels):]), new_cache if return_cache else {}


class JoinedKernel(nnx.Param):
    """Kernels of a layer's projections joined along the outputs, stored once: decoding stores them so
    (jaxlin.generate.cache.for_decoding), where joining them in every step cost a copy of them per token.
    Metadata ``names``: the projections, in order."""


class OutputMajorKernel(nnx.Param):
    """A projection's kernel stored transposed, ``[out, in]``, so that each output's weights are contiguous:
    decoding stores c_fc's so where the MLP may decode in ``kernels.decode_mlp``
    (jaxlin.generate.cache.for_decoding)."""


def joined_projections(layer: nnx.Module, *, with_gate: bool = False) -> list[str]:
    """The names of the projections computed in one matrix product: the stored `JoinedKernel`'s, else q, k, v,
    the layer's `JOINED_EXTRAS` it has and, ``with_gate``, its output gate's projection (when it has one)."""
    joined = getattr(layer, "joined_kernel", None)
    if joined is not None:
        return list(joined.names)
    names = ("q_proj", "k_proj", "v_proj", *layer.JOINED_EXTRAS, *(("g_proj",) if with_gate else ()))
    return [name for name in names if getattr(layer, name) is not None]


def joined_product(layer: nnx.Module, x, *, with_gate: bool = False):
    """`x` times the `joined_projections`' kernels joined along the outputs (the layer's `JoinedKernel` when
    it has one), and their names: one kernel, and one product for the input's gradient, instead of one per
    projection. In FP8 when q_proj is (jaxlin.layers.fp8), with one scale for the joined kernel."""
    names = joined_projections(layer, with_gate=with_gate)
    projections = [getattr(layer, name) for name in names]
    joined = getattr(layer, "joined_kernel", None)
    if joined is None:
        kernel = jnp.concatenate([p.kernel[...] for p in projections], axis=1).astype(projections[0].dtype)
    else:
        kernel = joined[...]
    return fp8.matmul(x.astype(projections[0].dtype), kernel, projections[0]), names


def project_qkv(layer: nnx.Module, x, *, segment_ids, state: dict, return_state: bool):
    """q, k, v of a linear-attention layer (its q/k/v projections, then the optional short convs) split
    into heads, the outputs of the other projections of its joined product by name (its `JOINED_EXTRAS`, and
    when decoding its output gate's), and the convs' new cache.

    In training the layers keep their output gate's projection (as wide as v) out of the joined product: as
    columns of it, it had to be copied out (forward, and again when the backward recomputes it) and its
    gradient copied into the joined gradient, passes that cost more than a product of its own."""
    y, names = joined_product(layer, x)
    widths = [getattr(layer, name).out_features for name in names]
    conv_cache = {}
    if layer.conv is not None:
        (q, k, v), rest, conv_cache = layer.conv(y, widths[3:], segment_ids=segment_ids, cache=state.get("conv"),
                                                 return_cache=return_state)
    else:
        q, k, v, *rest = conv.split_channels(y, widths)
    return tuple(split_heads(t, layer.n_head) for t in (q, k, v)), dict(zip(names[3:], rest)), conv_cache


def output_gate(layer: nnx.Module, x, extras: dict):
    """The output gate's projection of x: from the joined product when it holds it, else its own product
    (None for a layer without one)."""
    if "g_proj" in extras:
        return extras["g_proj"]
    return None if layer.g_proj is None else layer.g_proj(x)


class Decoding(NamedTuple):
    """What the decoding kernels take of a recurrent layer (its ``decoding()``): the step's static description,
    the output norm, the rule's params (``kernels.decode_step.decode_step``)."""
    step: ops.DecodeStep
    norm: GatedRMSNorm
    params: tuple


def decode_step_of(layer: nnx.Module, rule: str, norm: GatedRMSNorm, *, gated_norm: bool, **gla) -> ops.DecodeStep:
    """The static description of a recurrent layer's decoding step (``kernels.decode_step``); ``gla``: GLA's
    ``gate_normalizer`` and ``gate_rank``."""
    return ops.DecodeStep(rule=rule, heads=layer.n_head, key_dim=layer.q_proj.out_features // layer.n_head,
                          value_dim=layer.v_proj.out_features // layer.n_head,
                          conv_width=0 if layer.conv is None else layer.conv.width, eps=norm.eps,
                          gated_norm=gated_norm, **gla)


def decodes_in_kernel(layer: nnx.Module, step: ops.DecodeStep, x, *, segment_ids, state: dict,
                      return_state: bool) -> bool:
    """Whether this call is a decoding step that `decode_in_kernel` runs (``dispatch.decode_kernel_applies``)."""
    return dispatch.decode_kernel_applies(layer.impl, step, x, segment_ids=segment_ids, state=state,
                                          return_state=return_state)


def step_with_gate_column(layer: nnx.Module, step: ops.DecodeStep, names) -> ops.DecodeStep:
    """``step`` with the column of the joined product ``names`` where the output gate's starts (when in it)."""
    if "g_proj" not in names:
        return step
    before = names[:names.index("g_proj")]
    return dataclasses.replace(step, gate_column=sum(getattr(layer, name).out_features for name in before))


def decode_in_kernel(layer: nnx.Module, decoding: Decoding, x, state: dict):
    """A decoding step ``x [B, 1, D]`` of a recurrent layer: its joined input product (the output gate's
    columns in it, except in FP8, where the gate's product has scales of its own), then everything up to the output
    projection in one kernel (``ops.decode_step``). Returns the layer's ``(y, new state)``."""
    y, names = joined_product(layer, x[:, 0], with_gate=not fp8.runs_in_fp8(layer.q_proj))
    step = step_with_gate_column(layer, decoding.step, names)
    gate = None if "g_proj" in names or not step.gated_norm else layer.g_proj(x[:, 0])
    conv = layer.conv
    o, recurrent, caches = ops.decode_step(
        step, y, gate, [state["conv"][name] for name in "qkv"], [c.kernel[...] for c in (conv.q, conv.k, conv.v)],
        state["recurrent"], decoding.norm.weight[...], decoding.params)
    return layer.o_proj(o)[:, None], {"recurrent": recurrent, "conv": dict(zip("qkv", caches))}
