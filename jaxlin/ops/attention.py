"""Causal softmax attention for the softmax layers: cuDNN's fused flash attention on GPU, XLA's elsewhere.

Both go through ``jax.nn.dot_product_attention`` with q, k, v as [B, T, N, H]. The cuDNN kernel skips the
masked upper triangle and never writes the [B, N, T, T] scores; XLA's materialises them, which is what
tests compare against. cuDNN takes bf16/fp16 inputs with a head dim that is a multiple of 8 (at most 128
before Hopper, 256 from Hopper on). Packed documents (segment ids) reach it as a boolean [B, 1, T, T]
mask, which JAX turns into an additive bias: supported in both passes, but that bias is a T x T array per
sequence in HBM (512 MiB at B=4, T=8192), read by the forward and the backward, so packed training at long
T costs memory and bandwidth that the plain causal kernel does not. With a bias cuDNN also needs an even T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ModelConfig.attention_impl: "auto" is cuDNN where it applies (a GPU, bf16/fp16, a supported head dim;
# with segment ids also an even T), else XLA.
ATTENTION_IMPLS = ("auto", "cudnn", "xla")
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 256  # Hopper and later; cuDNN itself refuses more than 128 on older GPUs
# JAX's primitive for cuDNN's attention forward (jax._src.cudnn): its outputs are o and the softmax
# statistics that the backward kernel takes.
CUDNN_FORWARD_PRIMITIVE = "dot_product_attention_fwd_wrapper"


def save_cudnn_forward(prim, *_, **__) -> bool:
    """A `jax.checkpoint` policy: keep cuDNN attention's forward outputs, so that a remat'd block's backward
    pass runs only the backward kernel and never the attention forward again (o costs as much memory
    as one activation, the statistics 1/H of that)."""
    return prim.name == CUDNN_FORWARD_PRIMITIVE


def cudnn_refusal(dtype, head_dim: int, seq_len: int | None = None, segments: bool = False) -> str | None:
    """Why cuDNN's flash attention cannot take these inputs, or None when it can. Hardware-independent:
    it does not ask which GPU (if any) is present."""
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        return f"cuDNN attention needs bfloat16 or float16 inputs, got {jnp.dtype(dtype)}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"cuDNN attention needs a head dim that is a multiple of 8 and <= {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
    if segments and seq_len is not None and seq_len % 2:
        return f"cuDNN attention with segment ids (a bias) needs an even sequence length, got {seq_len}"
    return None


def resolve_impl(impl: str, dtype, head_dim: int, seq_len: int | None = None, segments: bool = False) -> str:
    """"cudnn" or "xla" for ``impl`` (a value of ATTENTION_IMPLS); an explicit "cudnn" that cannot run
    raises one line naming the reason and the fix."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "xla":
        return "xla"
    refusal = cudnn_refusal(dtype, head_dim, seq_len, segments)
    on_gpu = jax.default_backend() == "gpu"
    if impl == "cudnn":
        if not on_gpu:
            raise ValueError(f"model.attention_impl='cudnn' needs a GPU, this runs on {jax.default_backend()}; "
                             "use 'auto' or 'xla'")
        if refusal:
            raise ValueError(f"model.attention_impl='cudnn': {refusal}; use 'auto' or 'xla'")
        return "cudnn"
    return "cudnn" if on_gpu and refusal is None else "xla"


def segment_mask(segment_ids):
    """[B, T] ids -> boolean [B, 1, T, T]: True where query and key are in the same document."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def causal_attention(q, k, v, *, segment_ids=None, impl: str = "auto"):
    """softmax(q k^T / sqrt(H)) v under the causal mask, within each segment when ``segment_ids`` [B, T]
    is given. q, k, v: [B, T, N, H] -> [B, T, N, H] in q's dtype."""
    B, T, N, H = q.shape
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must have shape [B, T] = {(B, T)}, got {tuple(segment_ids.shape)}")
    implementation = resolve_impl(impl, q.dtype, H, T, segments=segment_ids is not None)
    mask = None if segment_ids is None else segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
