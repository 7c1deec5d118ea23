"""Softmax attention's implementations (jaxlin.ops.attention): choice, validation, and cuDNN against XLA.

The cuDNN comparisons run only where JAX's default backend is a GPU:
``JAX_PLATFORMS=cuda python -m pytest tests/ops/test_attention.py -q``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.model import GPT, ModelConfig
from jaxlin.ops.attention import CUDNN_FORWARD_PRIMITIVE, causal_attention, cudnn_refusal, resolve_impl, segment_mask

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs a GPU")


def qkv(B, T, N, H, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (B, T, N, H), dtype) for key in keys)


def packed(B, T):
    """Documents of uneven lengths, a different packing per row, ids repeating across documents."""
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        for start in range(5 + 3 * b, T, 37 + 11 * b):
            ids[b, start:] += 1
    return jnp.asarray(ids % 3)


def naive_attention(q, k, v, segment_ids=None):
    """The definition, in float32: scores, causal (and same-document) mask, softmax, weighted values."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    T = q.shape[1]
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    allowed = jnp.tril(jnp.ones((T, T), bool))[None, None]
    if segment_ids is not None:
        allowed = allowed & segment_mask(segment_ids)
    weights = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


@pytest.mark.parametrize("segments", [False, True])
def test_xla_path_is_the_definition_and_unchanged(segments):
    q, k, v = qkv(2, 70, 3, 16, jnp.float32)
    ids = packed(2, 70) if segments else None
    out = causal_attention(q, k, v, segment_ids=ids, impl="xla")
    np.testing.assert_allclose(out, naive_attention(q, k, v, ids), rtol=1e-5, atol=1e-5)
    # What the softmax layer called before it chose an implementation: XLA with a boolean mask.
    before = jax.nn.dot_product_attention(q, k, v, mask=None if ids is None else segment_mask(ids), is_causal=True)
    np.testing.assert_array_equal(causal_attention(q, k, v, segment_ids=ids), before)


def test_choice_off_the_gpu():
    if ON_GPU:
        pytest.skip("checks the choice on a host without a GPU")
    assert resolve_impl("auto", jnp.bfloat16, 64) == "xla"
    assert resolve_impl("xla", jnp.bfloat16, 64) == "xla"
    with pytest.raises(ValueError, match="'cudnn' needs a GPU.*use 'auto' or 'xla'"):
        resolve_impl("cudnn", jnp.bfloat16, 64)


def test_choice_on_a_gpu(monkeypatch):
    """The decision alone (no kernel runs): cuDNN where it applies, XLA otherwise, refusals for "cudnn"."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_impl("auto", jnp.bfloat16, 64) == "cudnn"
    assert resolve_impl("auto", jnp.bfloat16, 64, 129) == "cudnn"
    assert resolve_impl("auto", jnp.float32, 64) == "xla"
    assert resolve_impl("auto", jnp.bfloat16, 64, 129, segments=True) == "xla"  # a bias needs an even T
    assert resolve_impl("auto", jnp.bfloat16, 64, 128, segments=True) == "cudnn"
    assert resolve_impl("xla", jnp.bfloat16, 64) == "xla"
    with pytest.raises(ValueError, match="'cudnn': cuDNN attention with segment ids .* even sequence length"):
        resolve_impl("cudnn", jnp.bfloat16, 64, 129, segments=True)
    with pytest.raises(ValueError, match="'cudnn': cuDNN attention needs bfloat16"):
        resolve_impl("cudnn", jnp.float32, 64)


@pytest.mark.parametrize("args, reason", [
    ((jnp.float32, 64), "bfloat16 or float16"),
    ((jnp.bfloat16, 60), "multiple of 8"),
    ((jnp.bfloat16, 512), "<= 256"),
    ((jnp.bfloat16, 64, 129, True), "even sequence length"),
])
def test_cudnn_refusals_name_the_reason(args, reason):
    assert reason in cudnn_refusal(*args)


def test_cudnn_takes_what_the_models_use():
    assert cudnn_refusal(jnp.bfloat16, 64) is None  # GPT-2 Medium: 1024 / 16 heads
    assert cudnn_refusal(jnp.float16, 128, 129) is None  # odd T is fine without segments
    assert cudnn_refusal(jnp.bfloat16, 64, 8192, True) is None


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        causal_attention(*qkv(1, 8, 1, 8, jnp.float32), impl="flash")


@pytest.mark.parametrize("bad, match", [
    (dict(attention_impl="flash"), "model.attention_impl: unknown 'flash'"),
    (dict(attention_impl="cudnn", dtype="float32"), "'cudnn': cuDNN attention needs bfloat16"),
    (dict(attention_impl="cudnn", dtype="bfloat16", n_head=5, n_embd=60), "multiple of 8"),
])
def test_config_refuses_at_build_time(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(n_layer=2, **{"n_head": 2, "n_embd": 64, "attn": "softmax", **bad})


def test_config_without_softmax_layers_ignores_the_setting():
    ModelConfig(n_layer=2, n_head=2, n_embd=64, attn="gla", dtype="float32", attention_impl="cudnn")


def test_cudnn_model_off_the_gpu_says_so():
    if ON_GPU:
        pytest.skip("checks the refusal on a host without a GPU")
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=32, attn="softmax", attention_impl="cudnn")
    with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
        GPT(cfg, rngs=nnx.Rngs(0))(jnp.ones((1, 8), jnp.int32))


def test_layers_get_the_config_impl():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, attn=("softmax", "gla"), dtype="float32",
                      attention_impl="xla")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    assert model.h[0].attn.impl == "xla"


def values_and_grads(impl, q, k, v, ids, do):
    out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, segment_ids=ids, impl=impl), q, k, v)
    return (out, *vjp(do))


@gpu_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("T", [256, 1030])
@pytest.mark.parametrize("segments", [False, True])
def test_cudnn_matches_xla(head_dim, T, segments):
    q, k, v = qkv(2, T, 4, head_dim, jnp.bfloat16)
    do = jax.random.normal(jax.random.key(7), q.shape, jnp.bfloat16)
    ids = packed(2, T) if segments else None
    assert resolve_impl("auto", q.dtype, head_dim, T, segments) == "cudnn"
    fused = jax.jit(values_and_grads, static_argnums=0)("cudnn", q, k, v, ids, do)
    plain = jax.jit(values_and_grads, static_argnums=0)("xla", q, k, v, ids, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, plain):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.linalg.norm(a - b) / np.linalg.norm(b)  # bf16 inputs and outputs on both sides
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
        assert np.max(np.abs(a - b)) < 5e-2 * np.max(np.abs(b)), name


@gpu_only
def test_model_loss_and_grads_on_cudnn_match_xla():
    def loss_and_grads(impl):
        cfg = ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=256, block_size=128, attn="softmax",
                          dtype="bfloat16", attention_impl=impl, remat="dots_and_activations")
        graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, 256)
        ids = packed(2, 128)

        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, segment_ids=ids)
            return jnp.mean(jax.nn.logsumexp(logits[..., :256], axis=-1))
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_c, grads_c), (loss_x, grads_x) = loss_and_grads("cudnn"), loss_and_grads("xla")
    np.testing.assert_allclose(loss_c, loss_x, rtol=1e-2)
    for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_x)):
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b) + 1e-6


def count_primitive(jaxpr, name: str) -> int:
    """Equations of primitive ``name`` in a jaxpr and every jaxpr nested in its equations' parameters."""
    def nested(value):
        if isinstance(value, jax.extend.core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jax.extend.core.Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            for item in value:
                yield from nested(item)
    return sum((eqn.primitive.name == name) + sum(count_primitive(sub, name) for v in eqn.params.values()
                                                   for sub in nested(v))
               for eqn in jaxpr.eqns)


def test_count_primitive_sees_nested_jaxprs():
    f = jax.checkpoint(lambda x: jnp.sin(jnp.sin(x)))
    assert count_primitive(jax.make_jaxpr(jax.jit(f))(1.0).jaxpr, "sin") == 2


@gpu_only
@pytest.mark.parametrize("remat", ["none", "dots", "dots_and_activations"])
def test_remat_policies_do_not_rerun_the_cudnn_forward(remat):
    """One cuDNN attention forward per layer in the train gradient: the policies keep its outputs."""
    cfg = ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=256, block_size=128, attn="softmax",
                      dtype="bfloat16", attention_impl="cudnn", remat=remat)
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jnp.zeros((2, 128), jnp.int32)
    grad = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens)))
    assert count_primitive(jax.make_jaxpr(grad)(params).jaxpr, CUDNN_FORWARD_PRIMITIVE) == cfg.n_layer
