"""model.matmul_precision="fp8": which products run in FP8, the loss beside bf16's, the scaling state's
updates (overwritten, never stepped by the optimizer), and exports without it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin import export
from jaxlin.layers.fp8 import Fp8Dot, Fp8Meta, split_fp8_meta
from jaxlin.model import GPT, ModelConfig, count_params
from jaxlin.train.config import default_config
from jaxlin.train.optimizer import make_optimizer
from jaxlin.train.step import create_train_state, loss_fn, train_step

E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)


def tiny(attn="gla", **kw):
    return ModelConfig(**{**dict(n_layer=1, n_head=2, n_embd=64, block_size=32, attn=attn, dtype="bfloat16",
                                 fp8_amax_history=4), **kw})


def batch_of(shape, seed=3):
    tokens = jax.random.randint(jax.random.key(seed), (*shape[:-1], shape[-1] + 1), 0, 50257)
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}


def optimizer():
    c = default_config()
    c.train.update(steps=10, warmup_steps=1)
    return make_optimizer(c.train)


def jitted_step(graphdef, opt):
    return jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, optimizer=opt, loss_chunk=64))


@pytest.mark.parametrize("bad, match", [
    (dict(matmul_precision="fp16"), "matmul_precision: unknown 'fp16'"),
    (dict(matmul_precision="fp8", mlp_impl="pallas"), "mlp_impl='pallas'.*no FP8 path"),
    (dict(fp8_amax_history=0), "fp8_amax_history must be >= 1"),
])
def test_bad_settings_name_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


@pytest.mark.parametrize("attn, projections", [
    ("gla", {"q_proj", "g_proj", "o_proj"}),
    ("gated_deltanet", {"q_proj", "g_proj", "o_proj"}),
    ("softmax", {"c_attn", "c_proj"}),
])
def test_projections_and_mlp_run_in_fp8_and_the_rest_does_not(attn, projections):
    model = GPT(tiny(attn, matmul_precision="fp8"), rngs=nnx.Rngs(0))
    fp8 = {".".join(map(str, path[:-1])) for path, _ in nnx.to_flat_state(nnx.state(model, Fp8Meta))}
    block = "h.0."
    assert fp8 == {f"{block}attn.{p}.dot_general" for p in projections} | {
        f"{block}mlp.c_fc.dot_general", f"{block}mlp.c_proj.dot_general"}
    assert model.h[0].mlp.impl == "xla"  # the fused GELU MLP has no FP8 path
    assert count_params(model) == count_params(GPT(tiny(attn), rngs=nnx.Rngs(0)))  # scales are not weights


@pytest.mark.parametrize("attn", ["gla", "softmax"])
def test_first_loss_is_finite_and_near_bf16(attn):
    batch = batch_of((2, 32))
    losses = {}
    for precision in ("bf16", "fp8"):
        graphdef, params = nnx.split(GPT(tiny(attn, matmul_precision=precision), rngs=nnx.Rngs(0)), nnx.Param)
        losses[precision] = float(loss_fn(params, graphdef, batch, 64))
    assert np.isfinite(losses["fp8"])
    assert abs(losses["fp8"] - losses["bf16"]) < 0.02 * losses["bf16"]


@pytest.mark.slow
def test_remat_keeps_the_gradients_and_the_scaling_state():
    """The GPT-2 Medium configs recompute under remat: the FP8 products' backward (and the new scaling state
    it hands back) must not change."""
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)

    def grads(remat):
        model = GPT(tiny(vocab_size=256, dtype="float32", matmul_precision="fp8", remat=remat), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        return jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p).hidden(tokens) ** 2)))(params)

    for got, want in zip(jax.tree.leaves(grads("dots_and_activations")), jax.tree.leaves(grads("none"))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_step_overwrites_the_scaling_state_with_its_new_values():
    opt = optimizer()
    graphdef, state = create_train_state(GPT(tiny(matmul_precision="fp8"), rngs=nnx.Rngs(0)), opt)
    weights, meta = split_fp8_meta(state.params)
    # The optimizer keeps moments of the weights only.
    assert len(jax.tree.leaves(state.opt_state)) == len(jax.tree.leaves(optimizer().init(weights)))
    step = jitted_step(graphdef, opt)
    batch = jax.tree.map(lambda x: x[None], batch_of((2, 32)))
    one, _ = step(state, batch)
    two, metrics = step(one, batch)
    assert np.isfinite(float(metrics["loss"]))
    fp8_dots = lambda s: [d for _, d in nnx.iter_graph(nnx.merge(graphdef, s.params)) if isinstance(d, Fp8Dot)]
    assert len(fp8_dots(two)) == 5
    for before, after in zip(fp8_dots(one), fp8_dots(two)):
        for name in ("input", "kernel", "output_grad"):
            first = np.asarray(getattr(before, f"{name}_amax_history")[...])
            history, scale = (np.asarray(getattr(after, f"{name}_{kind}")[...]) for kind in ("amax_history", "scale"))
            # Overwritten, not stepped: the newest amax first, the older ones rolled along unchanged.
            assert history[0] > 0 and first[0] > 0
            np.testing.assert_array_equal(history[1:], np.roll(first, -1)[1:])
            # The second step scaled by the first step's amax (delayed scaling): amax / the format's max.
            fmt_max = float(jnp.finfo(jnp.float8_e5m2 if name == "output_grad" else jnp.float8_e4m3fn).max)
            np.testing.assert_allclose(scale[0], first[0] / fmt_max, rtol=1e-6)


@pytest.mark.slow
def test_accumulated_micro_batches_record_the_whole_batch_amax():
    opt = optimizer()
    graphdef, state = create_train_state(GPT(tiny(matmul_precision="fp8"), rngs=nnx.Rngs(0)), opt)
    step = jitted_step(graphdef, opt)
    batch = batch_of((4, 16))
    one, m_one = step(state, jax.tree.map(lambda x: x[None], batch))
    two, m_two = step(state, jax.tree.map(lambda x: x.reshape(2, 2, -1), batch))
    np.testing.assert_allclose(m_one["loss"], m_two["loss"], rtol=1e-2)
    inputs = lambda s: [np.asarray(d.input_amax_history[...]) for _, d in nnx.iter_graph(nnx.merge(graphdef, s.params))
                        if isinstance(d, Fp8Dot)]
    for a, b in zip(inputs(one), inputs(two)):  # the max over micro-batches is the max over the batch
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_nonfinite_step_keeps_the_scaling_state():
    opt = optimizer()
    graphdef, state = create_train_state(GPT(tiny(matmul_precision="fp8"), rngs=nnx.Rngs(0)), opt)
    weights, meta = split_fp8_meta(state.params)
    poisoned = jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan) if p.ndim == 2 else p, weights)
    bad = state.replace(params=nnx.merge_state(poisoned, meta))
    new, metrics = jitted_step(graphdef, opt)(bad, jax.tree.map(lambda x: x[None], batch_of((2, 16))))
    assert int(metrics["nonfinite_in_a_row"]) == 1
    for a, b in zip(jax.tree.leaves(bad.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)


def test_export_writes_weights_only_and_loads_as_bf16(tmp_path):
    model = GPT(tiny(matmul_precision="fp8"), rngs=nnx.Rngs(0))
    export.save(model, tmp_path)
    assert json.loads((tmp_path / export.CONFIG).read_text())["matmul_precision"] == "bf16"
    loaded, config = export.load(tmp_path)
    assert not nnx.state(loaded, Fp8Meta)
    reference = GPT(tiny(), rngs=nnx.Rngs(0))
    tokens = jnp.arange(16, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(loaded(tokens), reference(tokens))


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py emulates them)")
def test_data_parallel_records_the_one_device_amax():
    """Each data-parallel group differentiates its share of the global mean loss, so the output gradients,
    and the amax recorded from them, are the one-device ones."""
    from jaxlin.train import sharding

    opt = optimizer()
    graphdef, state = create_train_state(GPT(tiny(matmul_precision="fp8", dtype="float32"), rngs=nnx.Rngs(0)), opt)
    batch = jax.tree.map(lambda x: x[None], batch_of((4, 32)))
    one, _ = jitted_step(graphdef, opt)(state, batch)
    mesh_config = default_config().mesh
    mesh_config.update(data=2, fsdp=1, num_devices=2)
    with jax.set_mesh(sharding.make_mesh(mesh_config)):
        two, _ = jitted_step(graphdef, opt)(state, batch)
    for (path, a), (_, b) in zip(nnx.to_flat_state(split_fp8_meta(one.params)[1]),
                                 nnx.to_flat_state(split_fp8_meta(two.params)[1])):
        np.testing.assert_allclose(np.asarray(b.get_value()), np.asarray(a.get_value()), rtol=1e-5, err_msg=str(path))
