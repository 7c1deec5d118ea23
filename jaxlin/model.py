"""GPT backbone in nanoGPT's shape, with any attention layer per block, and its config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin import ops
from jaxlin.ops import attention as attention_ops
from jaxlin.ops import dispatch
from jaxlin.ops import mlp as mlp_ops
from jaxlin.ops import norm as norm_ops
from jaxlin.layers import ATTENTION_KINDS, RECURRENT_KINDS, fp8
from jaxlin.layers.common import ACTIVATION_NAME, INIT_STD, activation, linear

# Attention settings that may be given per layer: a scalar applies to every layer, a tuple lists one per layer.
PER_LAYER_FIELDS = ("attn", "expand_k", "expand_v", "conv_size")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Matrix products, plus the recurrence's outputs and the kernels' saved chunk states, so the backward
    # pass re-runs only element-wise work, never a recurrence forward.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*ops.SAVEABLE_NAMES)),
    # Also the element-wise results that feed matrix products (LayerNorm, GELU, short convs, gated norm):
    # the backward pass then recomputes none of them.
    "dots_and_activations": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*ops.SAVEABLE_NAMES, ACTIVATION_NAME, mlp_ops.RESIDUAL_NAME)),
}
# Both also keep the softmax layers' cuDNN attention forward (jaxlin.ops.attention.save_cudnn_forward).
REMAT_POLICIES.update({name: jax.checkpoint_policies.save_from_both_policies(REMAT_POLICIES[name],
                                                                             attention_ops.save_cudnn_forward)
                       for name in ("dots", "dots_and_activations")})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    vocab_multiple: int = 64  # pad the embedding to a multiple of this (50257 -> 50304, as nanoGPT)
    block_size: int = 1024  # context length (size of the position embedding when there is one)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    attn: Any = "gla"  # "gla" | "deltanet" | "gated_deltanet" | "softmax", or a tuple per layer
    expand_k: Any = 0.5
    expand_v: Any = 1.0
    conv_size: Any = 4  # 0 turns the short convolution off
    pos_embedding: bool | None = None  # None: learned positions only when some layer is softmax
    norm_eps: float = 1e-5
    dtype: str = "bfloat16"  # compute dtype; parameters are always float32
    impl: str = "auto"  # linear-attention implementation, see jaxlin.ops
    # Softmax layers' attention (jaxlin.ops.attention): "auto" cuDNN's fused flash attention on GPU with
    # bf16, XLA otherwise; "cudnn"; "xla".
    attention_impl: str = "auto"
    # The single-device kernels, each "auto", "xla" or "pallas" (the rules: jaxlin.ops.dispatch): GELU fused
    # into the MLP's products (and a one-row decoding step's LayerNorm and MLP in one kernel), the recurrent
    # layers' short convs and gated norm, the blocks' LayerNorms with the residual adds.
    mlp_impl: str = "auto"
    elementwise_impl: str = "auto"
    layer_norm_impl: str = "auto"
    remat: str = "none"  # a key of REMAT_POLICIES: what each block saves for the backward pass
    # "fp8": the attention layers' projections and the MLP's products in FP8 (jaxlin.layers.fp8), with
    # scales from each tensor's last `fp8_amax_history` absolute maxima; "bf16": in the compute dtype.
    matmul_precision: str = "bf16"
    fp8_amax_history: int = 1024

    def __post_init__(self):
        for name in PER_LAYER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
                value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.n_layer:
                raise ValueError(f"model.{name} lists {len(value)} values but n_layer={self.n_layer}")
        for kind in set(self.per_layer("attn")):
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"model.attn: unknown kind {kind!r}; expected one of {sorted(ATTENTION_KINDS)}")
        if any(c == 1 or c < 0 for c in self.per_layer("conv_size")):
            raise ValueError("model.conv_size must be 0 (off) or >= 2")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat: unknown {self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        for name in ("mlp_impl", "elementwise_impl", "layer_norm_impl"):
            if getattr(self, name) not in dispatch.KERNEL_IMPLS:
                raise ValueError(f"model.{name}: unknown {getattr(self, name)!r}; "
                                 f"expected one of {dispatch.KERNEL_IMPLS}")
        if self.matmul_precision not in fp8.MATMUL_PRECISIONS:
            raise ValueError(f"model.matmul_precision: unknown {self.matmul_precision!r}; expected one of "
                             f"{fp8.MATMUL_PRECISIONS}")
        if self.matmul_precision == "fp8" and self.mlp_impl == "pallas":
            raise ValueError("model.mlp_impl='pallas' (the fused GELU MLP) has no FP8 path; use 'auto' or 'xla' "
                             "with model.matmul_precision='fp8'")
        if self.fp8_amax_history < 1:
            raise ValueError(f"model.fp8_amax_history must be >= 1, got {self.fp8_amax_history}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"model.dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.attention_impl not in attention_ops.ATTENTION_IMPLS:
            raise ValueError(f"model.attention_impl: unknown {self.attention_impl!r}; "
                             f"expected one of {attention_ops.ATTENTION_IMPLS}")
        if self.attention_impl == "cudnn" and "softmax" in self.per_layer("attn"):
            refusal = attention_ops.cudnn_refusal(self.dtype, self.n_embd // self.n_head)
            if refusal:
                raise ValueError(f"model.attention_impl='cudnn': {refusal}; use 'auto' or 'xla'")

    def per_layer(self, name: str) -> tuple:
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * self.n_layer

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @property
    def uses_pos_embedding(self) -> bool:
        if self.pos_embedding is not None:
            return self.pos_embedding
        return "softmax" in self.per_layer("attn")

    @property
    def is_recurrent(self) -> bool:
        return all(kind in RECURRENT_KINDS for kind in self.per_layer("attn"))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


class MLP(nnx.Module):
    """c_fc, GELU (tanh form), c_proj; ``impl`` as ModelConfig.mlp_impl under the model's remat and precision
    (``dispatch.mlp_impl``), ``decode_impl`` ModelConfig.mlp_impl itself, for a one-row decoding step's kernel
    (``decode``; a step has no backward to remat)."""

    def __init__(self, d_model: int, *, out_std: float, dtype, rngs: nnx.Rngs, impl: str = "auto",
                 decode_impl: str = "auto"):
        self.c_fc = linear(d_model, 4 * d_model, dtype=dtype, rngs=rngs)
        self.c_proj = linear(4 * d_model, d_model, dtype=dtype, rngs=rngs, std=out_std)
        self.impl = impl
        self.decode_impl = decode_impl

    def __call__(self, x):
        w_fc, w_proj = self.fc_kernel(), self.proj_kernel()
        x = x.astype(self.c_fc.dtype)
        if dispatch.fused_mlp_applies(self.impl, x, w_fc):
            return mlp_ops.gelu_mlp(x, w_fc, w_proj)
        h = activation(jax.nn.gelu(fp8.matmul(x, w_fc, self.c_fc), approximate=True))
        return fp8.matmul(h, w_proj, self.c_proj)

    def fc_kernel(self):
        """c_fc's kernel ``[d, 4 d]`` in the compute dtype: the transpose of ``fc_by_output`` where decoding stores
        that (jaxlin.generate.cache.for_decoding)."""
        stored = getattr(self, "fc_by_output", None)
        return (self.c_fc.kernel[...] if stored is None else stored[...].T).astype(self.c_fc.dtype)

    def proj_kernel(self):
        """c_proj's kernel ``[4 d, d]`` in the compute dtype."""
        return self.c_proj.kernel[...].astype(self.c_proj.dtype)

    def decodes_in_kernel(self, x, decoding: bool) -> bool:
        """Whether `decode` runs this call on ``x [B, T, D]`` (``dispatch.decode_mlp_applies``; not in FP8)."""
        return not fp8.runs_in_fp8(self.c_fc) and dispatch.decode_mlp_applies(
            self.decode_impl, x, self.c_fc.out_features, decoding=decoding)

    def decode(self, x, ln: nnx.LayerNorm):
        """``self(ln(x))`` for a one-row decoding step ``x [1, 1, D]``, in one kernel, in x's dtype. The
        LayerNorm's scale and bias are rounded to its dtype first, as Flax's LayerNorm does."""
        y = mlp_ops.decode_mlp(x[:, 0], *rounded_params(ln), self.fc_kernel().T, self.proj_kernel(), eps=ln.epsilon)
        return y.astype(x.dtype)[:, None]


def rounded_params(ln: nnx.LayerNorm):
    """A LayerNorm's scale and bias in its dtype, as Flax's LayerNorm rounds them before use."""
    return tuple(p[...].astype(ln.dtype) for p in (ln.scale, ln.bias))


def layer_norm(d: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(d, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm block: x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        dtype = config.compute_dtype
        out_std = INIT_STD / math.sqrt(2 * config.n_layer)  # residual projections, as nanoGPT
        kind = config.per_layer("attn")[layer]
        kwargs = {}
        if kind in RECURRENT_KINDS:
            kwargs = dict(expand_k=config.per_layer("expand_k")[layer], expand_v=config.per_layer("expand_v")[layer],
                          conv_size=config.per_layer("conv_size")[layer], norm_eps=config.norm_eps, impl=config.impl,
                          elementwise_impl=config.elementwise_impl)
        elif kind == "softmax":
            kwargs = dict(impl=config.attention_impl)
        self.ln_1 = layer_norm(config.n_embd, config.norm_eps, dtype, rngs)
        self.attn = ATTENTION_KINDS[kind](config.n_embd, config.n_head, out_std=out_std, dtype=dtype, rngs=rngs,
                                          **kwargs)
        self.ln_2 = layer_norm(config.n_embd, config.norm_eps, dtype, rngs)
        self.mlp = MLP(config.n_embd, out_std=out_std, dtype=dtype, rngs=rngs,
                       impl=dispatch.mlp_impl(config.mlp_impl, config.remat, config.matmul_precision),
                       decode_impl=config.mlp_impl)
        if config.matmul_precision == "fp8":
            fp8.use_fp8(self.attn, config.fp8_amax_history)
            fp8.use_fp8(self.mlp, config.fp8_amax_history)
        self.layer_norm_impl = config.layer_norm_impl

    def __call__(self, x, segment_ids=None, state=None, return_state=False):
        """``(x out, the layer's new state)``."""
        attend = lambda h: self.attn(activation(h), segment_ids=segment_ids, state=state, return_state=return_state)
        if dispatch.layer_norm_applies(x, self.layer_norm_impl):
            x, h = self._norm(self.ln_1, x, None)
            y, new_state = attend(h)
            x, h = self._norm(self.ln_2, x, y)
        else:
            y, new_state = attend(self.ln_1(x))
            x = x + y
            if self.mlp.decodes_in_kernel(x, decoding=return_state):  # one row: the LayerNorm in the kernel
                return x + self.mlp.decode(x, self.ln_2), new_state
            h = self.ln_2(x)
        return x + self.mlp(activation(h)), new_state

    @staticmethod
    def _norm(ln: nnx.LayerNorm, x, residual):
        """``(x + residual, ln(x + residual))`` in one kernel (``(x, ln(x))`` without a residual)."""
        return norm_ops.residual_layer_norm(x, residual, ln.scale[...], ln.bias[...], eps=ln.epsilon)


def _block_forward(block: Block, x, segment_ids):
    return block(x, segment_ids)[0]


class GPT(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(INIT_STD)
        self.wte = nnx.Param(init(rngs.params(), (config.padded_vocab_size, config.n_embd), jnp.float32))
        self.wpe = (nnx.Param(init(rngs.params(), (config.block_size, config.n_embd), jnp.float32))
                    if config.uses_pos_embedding else None)
        self.h = nnx.List([Block(config, i, rngs=rngs) for i in range(config.n_layer)])
        self.ln_f = layer_norm(config.n_embd, config.norm_eps, config.compute_dtype, rngs)

    @property
    def supports_state(self) -> bool:
        return self.config.is_recurrent

    def hidden(self, tokens, *, segment_ids=None, state=None, return_state=False):
        """Final-LayerNorm hidden states [B, T, n_embd] (and the new per-layer state when asked)."""
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time] integers, got shape {tokens.shape}")
        if (state is not None or return_state) and not self.supports_state:
            raise ValueError("state reuse needs a model whose every layer is recurrent (no softmax layers)")
        x = jnp.take(self.wte[...], tokens, axis=0)
        if self.wpe is not None:
            if tokens.shape[1] > cfg.block_size:
                raise ValueError(f"sequence length {tokens.shape[1]} exceeds block_size={cfg.block_size}")
            x = x + self.wpe[: tokens.shape[1]]
        x = x.astype(cfg.compute_dtype)
        new_state = []
        block_forward = _block_forward
        if cfg.remat != "none" and not return_state:
            block_forward = nnx.remat(_block_forward, policy=REMAT_POLICIES[cfg.remat])
        for i, block in enumerate(self.h):
            if return_state or state is not None:
                x, layer_state = block(x, segment_ids, None if state is None else state[i], return_state)
                new_state.append(layer_state)
            else:
                x = block_forward(block, x, segment_ids)
        x = self.ln_f(x)
        return (x, new_state) if return_state else x

    def logits(self, h):
        """Tied head: [B, T, n_embd] -> float32 [B, T, padded_vocab] (columns past vocab_size are padding)."""
        return jnp.einsum("btd,vd->btv", h, self.wte[...].astype(h.dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens, *, segment_ids=None, state=None, return_state=False):
        if return_state:
            h, new_state = self.hidden(tokens, segment_ids=segment_ids, state=state, return_state=True)
            return self.logits(h), new_state
        return self.logits(self.hidden(tokens, segment_ids=segment_ids, state=state))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(fp8.Fp8Meta)))))
