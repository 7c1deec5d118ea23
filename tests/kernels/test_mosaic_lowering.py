"""The Mosaic GPU kernels lower for CUDA on any machine: jax emits their Mosaic GPU programs while
lowering, before any GPU is involved, and refuses there a kernel whose SMEM exceeds a Hopper SM's or
whose register layouts do not match. Every shape class the Mosaic backends accept is lowered here,
forward and backward; ``KERNELS_ON_GPU=1`` runs (tests/kernels/test_gla.py, test_delta.py) compile and
check their numbers."""

import jax
import jax.numpy as jnp
import pytest

from kernels.common import chunk_relative_segments, segment_index
from kernels.delta import delta_pallas
from kernels.gla import gla_pallas, mosaic_backward
from kernels.gla.mosaic_forward import gla_forward_mosaic


def _lower(f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _lower_grad(loss, *args):
    return _lower(jax.grad(loss, argnums=tuple(range(len(args)))), *args)


def _inputs(B, T, H, K, V, packed):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k = (jax.random.normal(x, (B, T, H, K), jnp.bfloat16) for x in keys[:2])
    v = jax.random.normal(keys[2], (B, T, H, V), jnp.bfloat16)
    segment_ids = jnp.zeros((B, T), jnp.int32).at[:, T // 3:].set(1) if packed else None
    return q, k, v, segment_ids


# (B, H): one program per head and V-block, or enough heads (128) that the state passes keep V whole
@pytest.mark.slow
@pytest.mark.parametrize("B,H", [(1, 1), (128, 1)])
@pytest.mark.parametrize("K,V", [(64, 64), (64, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize("gated,packed", [(True, True), (False, False)])
def test_delta_kernels_lower(B, H, K, V, gated, packed):
    q, k, v, segment_ids = _inputs(B, 128, H, K, V, packed)
    g = -jax.random.uniform(jax.random.key(1), (B, 128, H)) if gated else None
    beta = jax.random.uniform(jax.random.key(2), (B, 128, H))
    h0 = jnp.zeros((B, H, K, V))

    def loss(q, k, v, beta, h0):
        o, final = delta_pallas(q, k, v, g, beta, scale=0.1, initial_state=h0, output_final_state=True,
                                segment_ids=segment_ids, backend="mosaic")
        return o.astype(jnp.float32).sum() + final.sum()

    text = _lower_grad(loss, q, k, v, beta, h0)
    for name in ("delta_transform_mosaic", "delta_state_outputs_mosaic", "delta_state_grad_pass_mosaic",
                 "delta_output_path_grads_mosaic", "delta_wy_path_grads_mosaic"):
        assert name in text


@pytest.mark.slow
@pytest.mark.parametrize("B,H", [(1, 1), (128, 1)])
@pytest.mark.parametrize("K,V", [(32, 64), (32, 128), (64, 64), (64, 128)])
@pytest.mark.parametrize("packed", [True, False])
def test_gla_kernels_lower(B, H, K, V, packed):
    """The forward through ``gla_pallas``; the Mosaic backward directly, where it applies: the
    backward's Triton fallback (strongly decaying chunks) cannot lower without a GPU."""
    T = 128
    q, k, v, segment_ids = _inputs(B, T, H, K, V, packed)
    g = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(1), (B, T, H, K))).astype(jnp.bfloat16)
    h0 = jnp.zeros((B, H, K, V))

    def forward(q, k, v, g, h0):
        return gla_pallas(q, k, v, g, scale=0.1, initial_state=h0, output_final_state=True,
                          segment_ids=segment_ids, backend="mosaic")

    assert "gla_forward_mosaic" in _lower(forward, q, k, v, g, h0)
    if not mosaic_backward.supports(K, V):
        return
    rel = None if segment_ids is None else chunk_relative_segments(segment_index(segment_ids, B, T, T))

    def backward(q, k, v, g, h0_t, do, dht):
        _, hs, _ = gla_forward_mosaic(q, k, v, g, rel, h0_t, scale=0.1, interpret=False)
        later = mosaic_backward.final_state_gate_grad(k, v, g, rel, hs[:, :, -1], dht)
        return mosaic_backward.gla_backward_mosaic(q, k, v, g, do, rel, hs, dht, later, scale=0.1,
                                                   interpret=False)

    h0_t = jnp.swapaxes(h0, -1, -2)
    assert "gla_backward_mosaic" in _lower(backward, q, k, v, g, h0_t, v, h0_t)


@pytest.mark.parametrize("tokens,width", [(32 * 1024, 1024), (256, 64)])
def test_gelu_matmul_kernels_lower(tokens, width):
    """GPT-2 Medium's MLP and the smallest shape the tiles take: the forward and backward products fit in
    SMEM beside their operand rings."""
    from kernels import gelu_matmul
    x = jax.ShapeDtypeStruct((tokens, width), jnp.bfloat16)
    w_fc = jax.ShapeDtypeStruct((width, 4 * width), jnp.bfloat16)
    h = jax.ShapeDtypeStruct((tokens, 4 * width), jnp.bfloat16)
    assert "gelu_product_kernel" in _lower(gelu_matmul.gelu_product, x, w_fc)
    assert "gelu_grad_product_kernel" in _lower(gelu_matmul.gelu_grad_product, x, w_fc, h)
