"""Analytic FLOP count of a training step (the one place that decides it) and MFU."""

from __future__ import annotations

import jax

from jaxlin.model import ModelConfig
from jaxlin.ops.chunked import CHUNK as CHUNK_SIZE

# Dense bf16 peak of one device, FLOP/s, by a substring of jax's device_kind.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def attention_flops_per_token(kind: str, n_embd: int, n_head: int, expand_k: float, expand_v: float,
                              seq_len: int) -> float:
    """Forward FLOPs of one layer's token mixing (what the projections do not count)."""
    if kind == "softmax":
        return 4.0 * seq_len * n_embd  # q k^T and p v over the whole (unmasked) sequence, as nanoGPT counts
    k, v = n_embd * expand_k / n_head, n_embd * expand_v / n_head
    c = min(CHUNK_SIZE, seq_len)
    # Chunked form per head: state read (q S) and write (k v^T), intra-chunk scores and mixing.
    per_head = 4 * k * v + 2 * c * (k + v)
    if kind in ("deltanet", "gated_deltanet"):
        # Plus the delta correction: w S, and the UT transform's k k^T, T (beta k) and T (beta v).
        per_head += 2 * k * v + 2 * c * (2 * k + v)
    return n_head * per_head


def train_flops_per_token(config: ModelConfig, n_matrix_params: int, seq_len: int) -> float:
    """Forward + backward (3x forward) FLOPs per trained token.

    `n_matrix_params` counts every >= 2-D weight once, the tied embedding as the head's matrix and not
    the learned positions: each such weight costs 2 FLOPs per element per token (depthwise conv kernels too).
    """
    forward = 2.0 * n_matrix_params
    for layer, kind in enumerate(config.per_layer("attn")):
        forward += attention_flops_per_token(
            kind, config.n_embd, config.n_head, config.per_layer("expand_k")[layer],
            config.per_layer("expand_v")[layer], seq_len,
        )
    return 3.0 * forward


def count_matrix_params(params, has_pos_embedding: bool, block_size: int, n_embd: int) -> int:
    total = sum(p.size for p in jax.tree.leaves(params) if p.ndim >= 2)
    return total - (block_size * n_embd if has_pos_embedding else 0)


def peak_flops(device: jax.Device) -> float | None:
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in device.device_kind:
            return flops
    return None
