"""A GPT's forward pass over per-layer generation state: prefill of a prompt, then one token at a time.

The state of each layer is what its attention layer continues from (`state=` of its call): for GLA,
DeltaNet and Gated DeltaNet the recurrent state ``[B, H, K, V]`` (float32) and each short conv's last
``conv_size - 1`` inputs, a fixed size whatever the context; for softmax layers a preallocated KV cache.
Prompts are left-padded so that every row's last token sits at the same slot: the padding carries segment
id -1, so the recurrent layers restart at each row's first token and the softmax layers never read it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlin.layers import CausalSelfAttention
from jaxlin.layers import fp8
from jaxlin.layers.common import JoinedKernel, OutputMajorKernel, joined_projections
from jaxlin.model import GPT, MLP


def for_decoding(model: nnx.Module) -> nnx.Module:
    """A copy whose projection kernels are stored in the compute dtype, as every use casts them: a decode
    step then reads each weight once in that dtype instead of converting float32 weights every token. The
    kernels an attention layer multiplies in one product (`joined_projections`) are stored joined, once,
    rather than joined again in every step (a copy of them per token, 11 % of a GLA step at batch 1), and
    with them its output gate's, one product fewer a step (training keeps that one apart, see
    `project_qkv`); not in FP8, where the gate's product has scales of its own. An MLP that may decode in
    `kernels.decode_mlp` (its `decode_impl` not "xla", not in FP8) stores c_fc's kernel output-major
    (`OutputMajorKernel`), as the kernel reads it."""
    model = nnx.clone(model)
    modules = [module for _, module in nnx.iter_graph(model)]
    for module in modules:
        if isinstance(module, nnx.Linear):
            module.kernel.set_value(module.kernel.get_value().astype(module.dtype))
    for module in modules:
        if hasattr(module, "JOINED_EXTRAS"):
            names = joined_projections(module, with_gate=not fp8.runs_in_fp8(module.q_proj))
            projections = [getattr(module, name) for name in names]
            module.joined_kernel = JoinedKernel(jnp.concatenate([p.kernel.get_value() for p in projections], axis=1),
                                                names=tuple(names))
            for projection in projections:
                del projection.kernel
        if isinstance(module, MLP) and module.decode_impl != "xla" and not fp8.runs_in_fp8(module.c_fc):
            module.fc_by_output = OutputMajorKernel(module.c_fc.kernel.get_value().T)
            del module.c_fc.kernel
    return model


def init_cache(model: GPT, start, size: int) -> dict:
    """Empty state for rows whose tokens begin at slot `start` [B] (int32); softmax layers get `size` slots.
    "length" counts the slots consumed so far (padding included)."""
    x = jnp.zeros((start.shape[0], 1, model.config.n_embd), model.config.compute_dtype)
    layers = []
    for block in model.h:
        attn = block.attn
        if isinstance(attn, CausalSelfAttention):
            layers.append(attn.init_cache(start, size))
        else:
            shapes = jax.eval_shape(lambda: attn(x, return_state=True)[1])
            layers.append(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    return {"layers": layers, "length": jnp.zeros((), jnp.int32), "start": start.astype(jnp.int32)}


def forward(model: GPT, tokens, cache: dict, segment_ids=None):
    """Final-LayerNorm hidden states of `tokens` [B, T] continuing `cache`, and the new cache.

    Positions (for a position embedding) count from each row's first token; padding takes position 0, and
    positions past the embedding take its last (only the discarded tail of a decode block gets there)."""
    length, start = cache["length"], cache["start"]
    x = jnp.take(model.wte[...], tokens, axis=0)
    if model.wpe is not None:
        positions = length + jnp.arange(tokens.shape[1])[None] - start[:, None]
        wpe = model.wpe[...]
        x = x + jnp.take(wpe, jnp.clip(positions, 0, wpe.shape[0] - 1), axis=0)
    x = x.astype(model.config.compute_dtype)
    layers = []
    for block, state in zip(model.h, cache["layers"]):
        x, state = block(x, segment_ids, state, True)
        layers.append(state)
    return model.ln_f(x), {"layers": layers, "length": length + tokens.shape[1], "start": start}


def logits(h, head):
    """The tied head as GPT.logits computes it, from `head` = wte in the compute dtype (cast once)."""
    return jnp.einsum("btd,vd->btv", h, head, preferred_element_type=jnp.float32)


def _restart_rows(cache: dict, rows) -> dict:
    """Zeroes the recurrent layers' state of `rows` [B] (bool): rows whose first token is still ahead."""
    def restart(state):
        if "recurrent" not in state:
            return state  # a KV cache: its padding slots are masked instead
        return jax.tree.map(lambda s: jnp.where(rows.reshape(-1, *[1] * (s.ndim - 1)), 0, s), state)
    return cache | {"layers": [restart(state) for state in cache["layers"]]}


def prefill(model: GPT, head, tokens, cache: dict, *, chunk: int, padded: bool = True):
    """Runs left-padded prompts `tokens` [B, P] (P a multiple of `chunk`) in chunks of `chunk` tokens;
    returns the last position's logits [B, vocab] (float32) and the new cache. `padded`: whether any row
    has padding (without, the layers run without segment ids)."""
    B, P = tokens.shape
    if P % chunk:
        raise ValueError(f"prefill: prompt length {P} is not a multiple of the chunk {chunk}")

    def step(cache, chunk_tokens):
        offset, start = cache["length"], cache["start"]
        segment_ids = None
        if padded:
            cache = _restart_rows(cache, offset <= start)
            slots = offset + jnp.arange(chunk)
            segment_ids = jnp.where(slots[None] >= start[:, None], 0, -1).astype(jnp.int32)
        h, cache = forward(model, chunk_tokens, cache, segment_ids)
        return cache, h[:, -1]

    chunks = jnp.moveaxis(tokens.reshape(B, P // chunk, chunk), 1, 0)
    cache, last = jax.lax.scan(step, cache, chunks)
    return logits(last[-1][:, None], head)[:, 0], cache


def decode_step(model: GPT, head, token, cache: dict):
    """One token per row, `token` [B]: its logits for the next token [B, vocab] and the new cache."""
    h, cache = forward(model, token[:, None], cache)
    return logits(h, head)[:, 0], cache
