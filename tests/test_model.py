import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.ops.conv import causal_conv
from jaxlin.ops.gates import log_sigmoid_gate
from jaxlin.model import GPT, MLP, ModelConfig, count_params

KINDS = ["gla", "deltanet", "gated_deltanet", "softmax"]


def tiny(attn="gla", **kw):
    base = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, attn=attn, dtype="float32")
    base.update(kw)
    return ModelConfig(**base)


def gpt2_medium_params(**kw):
    cfg = ModelConfig(n_layer=24, n_head=16, n_embd=1024, **kw)
    return count_params(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))


def test_reference_model_parameter_count():
    # The PyTorch reference (nanoGPT + FLA GatedLinearAttention, GPT-2 Medium) has exactly this many.
    assert gpt2_medium_params() == 354_401_792


def test_softmax_baseline_parameter_count():
    # nanoGPT GPT-2 Medium without biases, with the 50304-row padded embedding and learned positions.
    assert gpt2_medium_params(attn="softmax") == 354_650_112


@pytest.mark.slow
def test_per_layer_settings_build_mixed_stacks():
    cfg = tiny(n_layer=4, attn=("gated_deltanet", "gla") * 2, expand_k=(0.5, 0.625, 0.75, 1.0))
    model = GPT(cfg, rngs=nnx.Rngs(0))
    assert [type(b.attn).__name__ for b in model.h] == ["GatedDeltaNet", "GatedLinearAttention"] * 2
    assert model.h[3].attn.q_proj.kernel.shape == (64, 64)
    assert model.h[1].attn.q_proj.kernel.shape == (64, 40)


@pytest.mark.parametrize("attn", KINDS)
def test_causal(attn):
    model = GPT(tiny(attn), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 50257)
    changed = tokens.at[:, 21].set((tokens[:, 21] + 7) % 50257)
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 40, 50304) and a.dtype == jnp.float32
    np.testing.assert_allclose(a[:, :21], b[:, :21], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 21:], b[:, 21:])


@pytest.mark.parametrize("attn", ["gla", pytest.param("deltanet", marks=pytest.mark.slow),
                                  pytest.param("gated_deltanet", marks=pytest.mark.slow)])
def test_state_continuation_matches_full_sequence(attn):
    model = GPT(tiny(attn), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 37), 0, 50257)
    full = model(tokens)
    head, state = model(tokens[:, :20], return_state=True)
    tail, _ = model(tokens[:, 20:], state=state, return_state=True)
    np.testing.assert_allclose(jnp.concatenate([head, tail], 1), full, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("attn", KINDS)
def test_packed_documents_do_not_see_each_other(attn):
    model = GPT(tiny(attn), rngs=nnx.Rngs(0))
    a = jax.random.randint(jax.random.key(3), (1, 13), 0, 50257)
    b = jax.random.randint(jax.random.key(4), (1, 19), 0, 50257)
    packed = model(jnp.concatenate([a, b], 1), segment_ids=jnp.array([[0] * 13 + [1] * 19]))
    if attn == "softmax":  # learned positions do not restart, so only the first document compares
        np.testing.assert_allclose(packed[:, :13], model(a), rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_allclose(packed[:, 13:], model(b), rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_left_padding_with_segments_equals_unpadded():
    model = GPT(tiny("gla"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (1, 10), 0, 50257)
    padded = jnp.concatenate([jnp.zeros((1, 6), jnp.int32), tokens], 1)
    seg = jnp.array([[-1] * 6 + [0] * 10])
    _, state_p = model(padded, segment_ids=seg, return_state=True)
    _, state = model(tokens, return_state=True)
    for x, y in zip(jax.tree.leaves(state_p), jax.tree.leaves(state)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    model = GPT(tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = model(jnp.ones((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("bad, match", [
    (dict(attn="mamba"), "model.attn"),
    (dict(attn=("gla",)), "lists 1 values but n_layer=2"),
    (dict(conv_size=1), "conv_size"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(remat="some"), "model.remat"),
    (dict(mlp_impl="cublas"), "model.mlp_impl"),
    (dict(elementwise_impl="triton"), "model.elementwise_impl"),
    (dict(layer_norm_impl="triton"), "model.layer_norm_impl"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


def test_bad_inputs():
    model = GPT(tiny("softmax"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be"):
        model(jnp.ones((8,), jnp.int32))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(jnp.ones((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="state reuse"):
        model(jnp.ones((1, 8), jnp.int32), return_state=True)


@pytest.mark.parametrize("remat", ["dots", "dots_and_activations"])
@pytest.mark.parametrize("attn", ["gla", "gated_deltanet"])
def test_remat_policies_keep_what_they_name(attn, remat, capsys):
    """The backward pass must not re-run a forward kernel: both policies save the op's output and the
    Pallas kernels' chunk states (XLA then drops the dead recomputation); the second also the
    element-wise activations."""
    cfg = ModelConfig(vocab_size=256, n_layer=1, n_head=2, n_embd=64, block_size=64, attn=attn,
                      dtype="float32", impl="pallas", remat=remat)
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jnp.zeros((1, 64), jnp.int32)
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: jnp.sum(nnx.merge(graphdef, p).hidden(tokens)), params)
    saved = capsys.readouterr().out
    assert "named 'linear_attention_output'" in saved
    assert "named 'linear_attention_residual'" in saved
    assert ("named 'activation'" in saved) == (remat == "dots_and_activations")


def test_remat_saves_the_fused_mlp_residuals(capsys, monkeypatch):
    """Under "dots_and_activations" the fused MLP's h and gelu(h) are saved: otherwise the backward pass
    would re-run the fused c_fc product to get them back. (The products are replaced by their formulas:
    interpret mode's callbacks cannot be differentiated under remat.)"""
    from kernels import gelu_matmul

    def product(x, w, **_):
        h = jnp.dot(x, w)
        return h, jax.nn.gelu(h, approximate=True)

    monkeypatch.setattr(gelu_matmul, "gelu_product", product)
    monkeypatch.setattr(gelu_matmul, "gelu_grad_product",
                        lambda dy, w_t, h, **_: jnp.dot(dy, w_t) * gelu_matmul.gelu_derivative(h))
    cfg = ModelConfig(vocab_size=256, n_layer=1, n_head=2, n_embd=64, block_size=64, dtype="bfloat16",
                      impl="chunked", mlp_impl="pallas", remat="dots_and_activations")
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jnp.zeros((2, 64), jnp.int32)
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: jnp.sum(nnx.merge(graphdef, p).hidden(tokens).astype(jnp.float32)), params)
    assert capsys.readouterr().out.count("named 'gelu_matmul_residual'") == 2


def test_fused_gelu_mlp_matches_xla():
    """The MLP with GELU in its products' epilogues (kernels in interpret mode here) computes XLA's MLP."""
    x = jax.random.normal(jax.random.key(0), (2, 64, 64), jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(1), (2, 64, 64), jnp.bfloat16)
    mlps = {impl: MLP(64, out_std=0.02, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl=impl) for impl in ("xla", "pallas")}

    def value_and_grads(mlp):
        graphdef, params = nnx.split(mlp, nnx.Param)
        y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
        dparams, dx = vjp(dy)
        return y, dx, dparams["c_fc"]["kernel"][...], dparams["c_proj"]["kernel"][...]

    for got, want in zip(value_and_grads(mlps["pallas"]), value_and_grads(mlps["xla"])):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["gla", "gated_deltanet"])
def test_elementwise_kernels_match_xla(attn):
    """The short convs' and gated norm's kernels (interpret mode) give XLA's loss and gradients, with
    packed documents and under the remat policy of the GPT-2 Medium configs."""
    tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 256)
    segment_ids = jnp.zeros((2, 64), jnp.int32).at[:, 20:].set(1).at[1, 45:].set(2)

    def loss_and_grads(impl):
        cfg = tiny(attn, vocab_size=256, impl="chunked", elementwise_impl=impl, remat="dots_and_activations")
        graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens, segment_ids=segment_ids) ** 2)
        return jax.value_and_grad(loss)(params)

    want, got = loss_and_grads("xla"), loss_and_grads("pallas")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.slow
def test_layer_norm_kernels_match_flax():
    """The LayerNorm kernels with the residual adds (interpret mode) give Flax's loss and gradients."""
    tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, 256)

    def loss_and_grads(impl):
        cfg = tiny("gla", vocab_size=256, impl="chunked", layer_norm_impl=impl, remat="dots_and_activations")
        graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        return jax.value_and_grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2))(params)

    want, got = loss_and_grads("xla"), loss_and_grads("pallas")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(np.abs(b).max()))


def test_mlp_auto_keeps_xla_where_it_does_not_apply():
    """On CPU, and under remat "dots" (no room for the fused forward's stored gelu(h)), auto is XLA's MLP."""
    assert GPT(tiny(remat="dots"), rngs=nnx.Rngs(0)).h[0].mlp.impl == "xla"
    mlp = GPT(tiny(dtype="bfloat16"), rngs=nnx.Rngs(0)).h[0].mlp
    assert mlp.impl == "auto"
    traced = str(jax.make_jaxpr(mlp)(jnp.ones((2, 64, 64), jnp.bfloat16)))
    assert "custom_vjp" not in traced and "tanh" in traced


def test_gla_layer_gives_the_kernels_gates_in_the_compute_dtype(monkeypatch):
    """FLA's layer under autocast hands its kernel bf16 gates; the Mosaic GLA kernels (what "auto" takes on
    a GPU) read nothing else."""
    from jaxlin import ops
    seen = {}
    real_gla = ops.gla

    def spy(q, k, v, g, **kwargs):
        seen.update(q=q.dtype, g=g.dtype)
        return real_gla(q, k, v, g, **kwargs)

    monkeypatch.setattr(ops, "gla", spy)
    GPT(tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))(jnp.ones((1, 8), jnp.int32))
    assert seen == dict(q=jnp.bfloat16, g=jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots", "dots_and_activations"])
def test_remat_policies_give_the_same_gradients(remat):
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)

    def grads(policy):
        graphdef, params = nnx.split(GPT(tiny(vocab_size=256, remat=policy), rngs=nnx.Rngs(0)), nnx.Param)
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p).hidden(tokens) ** 2))(params)

    for got, want in zip(jax.tree.leaves(grads(remat)), jax.tree.leaves(grads("none"))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_short_conv_gradients_match_autodiff_of_the_formula():
    """The conv's hand-written backward against autodiff of silu(sum of masked taps), float32, with a
    cache and two packed documents (taps across the boundary read zero)."""
    B, T, C, W = 2, 11, 6, 4
    keys = jax.random.split(jax.random.key(0), 4)
    x, cache = jax.random.normal(keys[0], (B, T, C)), jax.random.normal(keys[1], (B, W - 1, C))
    kernel, dy = jax.random.normal(keys[2], (W, C)), jax.random.normal(keys[3], (B, T, C))
    segment_ids = jnp.array([[0] * 5 + [1] * 6, [2] * 11])

    def formula(x, cache, kernel):
        xp = jnp.concatenate([cache, x], axis=1)
        seg = jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (B, W - 1)), segment_ids], axis=1)
        taps = [jnp.where((seg[:, j:j + T] == segment_ids)[..., None], xp[:, j:j + T], 0) for j in range(W)]
        return jax.nn.silu(sum(t * kernel[j] for j, t in enumerate(taps)))

    ours = lambda x, cache, kernel: causal_conv(x, kernel, segment_ids=segment_ids, cache=cache)[0]
    y, vjp = jax.vjp(ours, x, cache, kernel)
    y_ref, vjp_ref = jax.vjp(formula, x, cache, kernel)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_forget_gate_gradients_match_autodiff_of_the_formula(dtype, tol):
    """The gate's hand-written backward against autodiff of log_sigmoid(h + b) / 16 in float32, on
    pre-activations from -40 to 40 (where sigmoid saturates) and a bias gradient summed over 2 x 7 tokens."""
    h = jnp.concatenate([jax.random.normal(jax.random.key(0), (2, 5, 8)) * 3,
                         jnp.linspace(-40.0, 40.0, 32).reshape(2, 2, 8)], axis=1)
    bias, dgate = jax.random.normal(jax.random.key(1), (8,)), jax.random.normal(jax.random.key(2), h.shape)
    formula = lambda h, bias: jax.nn.log_sigmoid(h + bias) / 16
    gate, vjp = jax.vjp(lambda h, b: log_sigmoid_gate(h, b, 16.0), h.astype(dtype), bias)
    gate_ref, vjp_ref = jax.vjp(formula, h.astype(dtype).astype(jnp.float32), bias)
    assert gate.dtype == dtype
    np.testing.assert_allclose(gate.astype(jnp.float32), gate_ref, rtol=tol, atol=tol)
    (dh, dbias), (dh_ref, dbias_ref) = vjp(dgate.astype(dtype)), vjp_ref(dgate.astype(dtype).astype(jnp.float32))
    assert dh.dtype == dtype and dbias.dtype == jnp.float32
    np.testing.assert_allclose(dh.astype(jnp.float32), dh_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-5, atol=1e-6)


def test_fused_gelu_mlp_refuses_a_mesh_of_several_devices():
    mlp = MLP(64, out_std=0.02, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl="pallas")
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="one device"):
        mlp(jnp.ones((2, 64, 64), jnp.bfloat16))


def test_elementwise_kernels_refuse_a_mesh_of_several_devices():
    """Forced on under a mesh, the kernels refuse with the fix; auto keeps XLA there."""
    from jaxlin.ops import dispatch
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert not dispatch.elementwise_kernels_apply("auto")
        with pytest.raises(ValueError, match="elementwise_impl='auto' or 'xla'"):
            dispatch.elementwise_kernels_apply("pallas")
        assert not dispatch.layer_norm_applies(jnp.ones((64, 64)), "auto")
        with pytest.raises(ValueError, match="layer_norm_impl='auto' or 'xla'"):
            dispatch.layer_norm_applies(jnp.ones((64, 64)), "pallas")
