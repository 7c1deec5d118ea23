"""A recurrent block's whole decoding step in one kernel (kernels.decode_block) against the block's own ops:
interpret mode on CPU at a small width, compiled at GPT-2 Medium's with ``KERNELS_ON_GPU=1``; the Triton
lowering against an abstract H100 on any machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.generate.cache import for_decoding
from jaxlin.model import Block, ModelConfig
from jaxlin.ops import dispatch
from kernels import decode_block, decode_step
from tests.kernels.kernel_checks import ON_GPU, random_layer_norms, triton_modules_for_cuda

# (width, heads) by dtype: GPT-2 Medium's on a GPU in bf16, half its width in float32 (at 1024, float32's c_fc
# is 256 tiles of TILE_BYTES, more than an H100's 132 programs); a small width in interpret mode.
DIMS = {"bfloat16": (1024, 16), "float32": (512, 8)} if ON_GPU else {"bfloat16": (64, 2), "float32": (64, 2)}
KINDS = ("gla", "deltanet", "gated_deltanet")


def _block(kind, dtype="float32", **overrides):
    """A decoding block (`for_decoding`'s layout) with LayerNorms away from the identity; its layer takes the
    step kernel (impl "pallas") and its MLP's decoding the kernels (``mlp_impl`` "pallas"; its training
    kernel, the fused GELU products, stays off)."""
    width, heads = DIMS[dtype]
    fields = dict(n_layer=2, n_head=heads, n_embd=width, attn=kind, dtype=dtype, impl="pallas") | overrides
    block = Block(ModelConfig(**fields | {"mlp_impl": "xla"}), 0, rngs=nnx.Rngs(1))
    block.mlp.decode_impl = fields.get("mlp_impl", "pallas")
    return for_decoding(random_layer_norms(block, seed=2))


def _state(block, rows, dtype, seed):
    """A layer state far from zero, with the block kernel's barrier word."""
    shapes = jax.eval_shape(lambda: block.attn(jnp.zeros((rows, 1, _width(block)), dtype), return_state=True)[1])
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    state = jax.tree.map(lambda s: (2 * jax.random.normal(next(keys), s.shape)).astype(s.dtype), shapes)
    return state | {"sync": jnp.zeros((), jnp.int32)}


def _width(block):
    return block.ln_1.num_features


def _step(block, x, state, *, in_kernel: bool):
    """The block's decoding step: whole in the kernel, or in its layer's ops (the token scan) and XLA's MLP.
    Products in true float32 (a GPU's default TF32 would round the two paths' differently)."""
    block = nnx.clone(block)
    if not in_kernel:
        block.attn.impl, block.mlp.decode_impl = "reference", "xla"
    assert (block.decode_description(x.shape[0]) is not None) == in_kernel
    with jax.default_matmul_precision("float32"):
        return jax.jit(lambda x, state: block(x, None, state, True))(x, state)


def _assert_close_to_largest(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got / scale, want / scale, atol=tol, rtol=0)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_blocks_ops(kind, dtype, tol, rows):
    """Output, recurrent state and conv caches. In bf16, outputs and states within about two ulps of the largest
    (a value rounded the other way on either path moves the ones after it, and XLA's products on a GPU sum in
    another order), and on CPU nearly all outputs equal."""
    block = _block(kind, dtype)
    dtype = jnp.dtype(dtype)
    x = (1 + 2 * jax.random.normal(jax.random.key(3), (rows, 1, _width(block)))).astype(dtype)
    state = _state(block, rows, dtype, seed=4)
    (want, want_state), (got, got_state) = (_step(block, x, state, in_kernel=k) for k in (False, True))
    _assert_close_to_largest(got, want, tol)
    if dtype == jnp.bfloat16 and not ON_GPU:  # 0-5 % differ at this width's draws (not measured at 1024)
        assert np.mean(np.asarray(got) != np.asarray(want)) <= 0.1
    for key in ("recurrent", "conv"):
        for g, w in zip(jax.tree.leaves(got_state[key]), jax.tree.leaves(want_state[key])):
            assert g.dtype == w.dtype and g.shape == w.shape
            if dtype == jnp.bfloat16:
                _assert_close_to_largest(g, w, tol)
            else:
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)
    if ON_GPU:  # four barriers a call, each leaving no arrivals and the generation one on
        assert int(got_state["sync"]) == 4 << decode_block.COUNT_BITS
        _, again = _step(block, x, got_state, in_kernel=True)
        assert int(again["sync"]) == 8 << decode_block.COUNT_BITS


def test_a_forward_without_state_out_keeps_the_barrier_word_out_of_it():
    """A call that returns no state (a forward continuing a decoding state) takes the block's ops."""
    block = _block("gla")
    x = jax.random.normal(jax.random.key(9), (1, 3, _width(block)))
    y, new_state = block(x, None, _state(block, 1, jnp.float32, seed=10), False)
    assert y.shape == x.shape and new_state is None


def test_which_steps_take_the_kernel(monkeypatch):
    block = _block("gla")
    assert block.may_decode_in_kernel()
    assert block.decode_description(2) is not None
    assert block.decode_description(dispatch.DECODE_BLOCK_MAX_ROWS + 1) is None  # XLA's GEMMs from there
    for overrides in (dict(mlp_impl="xla"), dict(impl="chunked"), dict(impl="auto"), dict(matmul_precision="fp8"),
                      dict(conv_size=0)):
        other = _block("gla", **overrides)
        assert not other.may_decode_in_kernel() and other.decode_description(1) is None, overrides
    assert nnx.clone(block).decode_description(1) is not None
    width, heads = DIMS["float32"]
    config = ModelConfig(n_layer=2, n_head=heads, n_embd=width, impl="pallas", mlp_impl="xla", dtype="float32")
    unprepared = Block(config, 0, rngs=nnx.Rngs(0))
    unprepared.mlp.decode_impl = "pallas"
    assert unprepared.may_decode_in_kernel() and unprepared.decode_description(1) is None  # no output-major kernels
    auto = _block("gla", impl="auto")  # the kernel's compiled checks have not run on a GPU: auto keeps per-op
    assert not auto.may_decode_in_kernel()
    gpu_auto_mlp = nnx.clone(block)
    gpu_auto_mlp.mlp.decode_impl = "auto"
    assert (gpu_auto_mlp.decode_description(1) is not None) == (jax.default_backend() == "gpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # a GPU stand-in
    monkeypatch.setattr(dispatch, "decode_block_programs", lambda: 132)
    description = gpu_auto_mlp.decode_description(1)
    assert description is not None and description.programs == 132
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):  # several devices
        assert not dispatch.decode_block_applies("pallas", "auto", description, 1, 4)
        with pytest.raises(ValueError, match="one device only"):
            dispatch.decode_block_applies("pallas", "pallas", description, 1, 4)


def test_a_state_without_the_barrier_word_takes_the_blocks_ops():
    """States that `init_cache` did not make (evaluation's state reuse, say) carry no "sync"."""
    block = _block("gla")
    x = jax.random.normal(jax.random.key(7), (1, 1, _width(block)))
    state = _state(block, 1, jnp.float32, seed=8)
    del state["sync"]
    traced = jax.make_jaxpr(lambda x, state: block(x, None, state, True))(x, state)
    assert not any(eqn.params.get("name", "").endswith("_decode_block") for eqn in traced.jaxpr.eqns)


def test_refuses_what_it_does_not_support():
    step = decode_step.Step("gla", 16, 32, 64, 4, 1e-5, True, gate_column=2064, gate_normalizer=16.0, gate_rank=16)
    block = decode_block.Block(step, 1024, 3088, 4096, 1e-5, programs=132)
    assert decode_block.supports(block, 2, 2)
    assert not decode_block.supports(block, 9, 2)  # a (row, head) pair for every program at most
    assert not decode_block.supports(decode_block.Block(step, 1024, 3088, 4096, 1e-5, programs=16), 1, 2)  # tiles
    apart = decode_block.Block(decode_step.Step("gla", 16, 32, 64, 4, 1e-5, True, gate_rank=16), 1024, 3088,
                               4096, 1e-5, programs=132)
    assert not decode_block.supports(apart, 1, 2)  # the output gate outside the joined product (FP8)
    assert not decode_block.supports(decode_block.Block(step, 1000, 3088, 4000, 1e-5, programs=132), 1, 2)


RULE_KEY_DIMS = {"gla": 32, "gated_delta": 64, "delta": 64}  # GPT-2 Medium's configs


def gpt2_medium_call(rule: str, rows: int = 2):
    """The kernel at GPT-2 Medium's widths in bf16, a program per SM of an H100: ``(f, abstract args)``."""
    spec, bf16, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    heads, key_dim, value_dim = 16, RULE_KEY_DIMS[rule], 64
    extras = {"gla": 16, "gated_delta": 2 * heads, "delta": heads}[rule]
    gated = rule != "delta"
    gate_column = heads * (2 * key_dim + value_dim) + extras
    step = decode_step.Step(rule, heads, key_dim, value_dim, 4, 1e-5, gated, gate_column=gate_column if gated else None,
                            gate_normalizer=16.0, gate_rank=16 if rule == "gla" else 0)
    joined = gate_column + (heads * value_dim if gated else 0)
    block = decode_block.Block(step, 1024, joined, 4096, 1e-5, programs=132)
    keys, values = heads * key_dim, heads * value_dim
    params = {"gla": (spec((16, keys), bf16), spec((keys,), f32)), "gated_delta": (spec((heads,), f32),) * 2,
              "delta": ()}[rule]
    args = (spec((rows, 1024), bf16), (spec((1024,), bf16),) * 2, spec((joined, 1024), bf16),
            spec((1024, values), bf16),
            (spec((1024,), bf16),) * 2, spec((4096, 1024), bf16), spec((1024, 4096), bf16),
            [spec((rows, 3, n), bf16) for n in (keys, keys, values)], [spec((4, n), f32) for n in (keys, keys, values)],
            spec((rows, heads, key_dim, value_dim), f32), spec((value_dim,), f32), params, spec((), jnp.int32))
    return lambda *a: decode_block.decode_block(block, *a), args


@pytest.mark.parametrize("rule", RULE_KEY_DIMS)
def test_lowers_for_an_h100_at_gpt2_medium_width(rule):
    """Two rows: one kernel, not phases, with four grid barriers, each an arrival, a release, and a spin on
    volatile loads before an acquiring read."""
    f, args = gpt2_medium_call(rule)
    [module] = triton_modules_for_cuda(f, *args)
    assert f"@{rule}_decode_block" in module
    assert module.count("tt.atomic_rmw") == 12 and module.count("isVolatile = true") == 4
