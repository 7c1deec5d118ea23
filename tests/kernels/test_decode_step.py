"""The fused decoding step (kernels.decode_step) against each recurrent layer's own ops: interpret mode on CPU
at small widths, compiled at GPT-2 Medium's with ``KERNELS_ON_GPU=1``; the Triton lowering against an abstract
H100 on any machine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.generate.cache import for_decoding
from jaxlin.layers import DeltaNet, GatedDeltaNet, GatedLinearAttention, fp8
from jaxlin.layers.common import decode_step_of
from jaxlin.ops import dispatch
from kernels import decode_step
from tests.kernels.kernel_checks import ON_GPU, lower_triton_for_cuda

WIDTH, HEADS = (1024, 16) if ON_GPU else (64, 2)
LAYERS = {  # per-head dims: GLA K 16, V 32 (GPT-2 Medium: 32, 64); the delta rules' K = V
    "gla": lambda **kw: GatedLinearAttention(WIDTH, HEADS, **kw),
    "deltanet": lambda **kw: DeltaNet(WIDTH, HEADS, **kw),  # no output gate: the norm is not gated
    "gated_deltanet": lambda **kw: GatedDeltaNet(WIDTH, HEADS, expand_k=0.5, **kw),  # K half of V
}


def _layer(name, dtype, **overrides):
    return LAYERS[name](out_std=0.02, dtype=dtype, rngs=nnx.Rngs(3), **overrides)


def _random_state(layer, batch, dtype, seed, state_scale=1.0):
    shapes = jax.eval_shape(lambda: layer(jnp.zeros((batch, 1, WIDTH), dtype), return_state=True)[1])
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    return jax.tree.map(lambda s: (state_scale * jax.random.normal(next(keys), s.shape)).astype(s.dtype), shapes)


def _step(layer, impl, x, state):
    """The layer's call with its ops (``impl="reference"``) or the kernel (``"pallas"``). Products in true
    float32: a GPU's default TF32 would round the two paths' differently shaped products (the kernel's joins
    the output gate's) differently."""
    layer.impl = impl
    with jax.default_matmul_precision("float32"):
        return layer(x, state=state, return_state=True)


def _check_kernel_step(layer, dtype, batch, seed, tol, state_scale=1.0):
    """The kernel's step against the layer's ops: output, recurrent state and every conv cache."""
    x = jax.random.normal(jax.random.key(seed), (batch, 1, WIDTH)).astype(dtype)
    state = _random_state(layer, batch, dtype, seed + 1, state_scale)
    want, got = _step(layer, "reference", x, state), _step(layer, "pallas", x, state)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol,
                                   err_msg=f"leaf {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 4e-3)])
@pytest.mark.parametrize("name", LAYERS)
def test_kernel_step_matches_the_layers_ops(name, dtype, tol):
    """Three rows (an odd batch), a state far from zero."""
    _check_kernel_step(_layer(name, dtype), dtype, batch=3, seed=1, tol=tol, state_scale=3.0)


@pytest.mark.parametrize("name", ["gla", "gated_deltanet"])
def test_a_gate_apart_from_the_joined_product(name):
    """FP8 decoding stores q|k|v|... without the output gate's kernel (its product keeps its own scales): the
    kernel then reads the gate as an array of its own."""
    layer = _layer(name, jnp.float32)
    fp8.use_fp8(layer, 4)
    layer = for_decoding(layer)
    assert "g_proj" not in layer.joined_kernel.names
    _check_kernel_step(layer, jnp.float32, batch=2, seed=7, tol=2e-5)


def test_extreme_gla_gates():
    """A forget gate that wipes the state (bias -30) and one that keeps it whole (bias +30)."""
    for bias in (-30.0, 30.0):
        layer = _layer("gla", jnp.float32, gate_logit_normalizer=1.0)
        layer.gk_up.bias.set_value(jnp.full_like(layer.gk_up.bias.get_value(), bias))
        _check_kernel_step(layer, jnp.float32, batch=2, seed=4, tol=2e-5)


def test_which_calls_take_the_kernel(monkeypatch):
    layer = _layer("gla", jnp.float32)
    step = decode_step_of(layer, "gla", layer.g_norm, gated_norm=True, gate_normalizer=16.0, gate_rank=16)
    assert decode_step.supports(step)
    state = _random_state(layer, 1, jnp.float32, seed=6)
    one, two = jnp.zeros((1, 1, WIDTH)), jnp.zeros((1, 2, WIDTH))

    def applies(impl="pallas", x=one, **kw):
        return dispatch.decode_kernel_applies(impl, step, x, **({"segment_ids": None, "state": state,
                                                                 "return_state": True} | kw))

    assert applies() and applies("pallas:triton")
    assert not applies(x=two)  # a prompt, not a step
    assert not applies(segment_ids=jnp.zeros((1, 1), jnp.int32))
    assert not applies(state={}) and not applies(return_state=False)
    assert not applies("reference") and not applies("chunked")
    assert applies("auto") == (jax.default_backend() == "gpu")  # auto takes it on one GPU only
    monkeypatch.setattr(dispatch, "on_one_gpu", lambda: True)
    assert applies("auto")
    # Several devices (an abstract mesh, so that the check also runs on one GPU): the layers' ops, whatever the impl.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
        assert not applies("auto") and not applies("pallas")
    assert not dispatch.decode_kernel_applies("pallas", dataclasses.replace(step, key_dim=24), one,
                                              segment_ids=None, state=state, return_state=True)
    no_conv = _layer("gla", jnp.float32, conv_size=0)
    assert not decode_step.supports(decode_step_of(no_conv, "gla", no_conv.g_norm, gated_norm=True,
                                                   gate_normalizer=16.0, gate_rank=16))


def test_refuses_what_it_does_not_support():
    step = decode_step.Step(rule="gla", heads=2, key_dim=24, value_dim=32, conv_width=4, eps=1e-5,
                            gated_norm=True, gate_rank=16)
    with pytest.raises(ValueError, match="powers of two"):
        decode_step.decode_step(step, *[None] * 6)


def _spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("rule,key_dim,gate_in_y", [("gla", 32, True), ("delta", 64, False),
                                                    ("gated_delta", 64, True), ("gated_delta", 64, False)])
def test_lowers_for_an_h100_at_gpt2_medium_width(rule, key_dim, gate_in_y):
    """Two rows (as a lone prompt decodes on a GPU), 16 heads, V 64, the reference configs' convs; the output
    gate's input in the joined product (decoding's bf16 layout) or apart (FP8's)."""
    B, H, V, width = 2, 16, 64, 4
    gla, gated_norm = rule == "gla", rule != "delta"
    Dk, Dv = H * key_dim, H * V
    extras = {"gla": 16, "delta": H, "gated_delta": 2 * H}[rule]
    step = decode_step.Step(rule=rule, heads=H, key_dim=key_dim, value_dim=V, conv_width=width, eps=1e-5,
                            gated_norm=gated_norm, gate_column=2 * Dk + Dv + extras if gate_in_y else None,
                            gate_normalizer=16.0, gate_rank=16 if gla else 0)
    params = {"gla": (_spec(16, Dk), _spec(Dk, dtype=jnp.float32)), "delta": (),
              "gated_delta": (_spec(H, dtype=jnp.float32), _spec(H, dtype=jnp.float32))}[rule]
    args = (_spec(B, 2 * Dk + Dv + extras + (Dv if gate_in_y else 0)),
            _spec(B, Dv) if gated_norm and not gate_in_y else None,
            [_spec(B, width - 1, d) for d in (Dk, Dk, Dv)], [_spec(width, d, dtype=jnp.float32) for d in (Dk, Dk, Dv)],
            _spec(B, H, key_dim, V, dtype=jnp.float32), _spec(V, dtype=jnp.float32), params)
    text = lower_triton_for_cuda(lambda *a: decode_step.decode_step(step, *a), *args)
    assert f"{rule}_decode_step" in text and "barrier" in text  # the in-place update's barrier
