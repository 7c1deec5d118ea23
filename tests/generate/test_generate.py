"""Prefill + decoding against the full-sequence forward, for every attention kind and the mixed stacks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.generate import GREEDY, Generator, Sampling, decode_step, generate, init_cache, prefill
from jaxlin.generate.cache import for_decoding, forward
from jaxlin.generate.loop import MIN_DECODE_ROWS, decode_block, decode_block_autotuned, prompt_length_bucket
from jaxlin.generate.sampling import row_keys, sample
from jaxlin.model import GPT, ModelConfig
from tests.kernels.kernel_checks import random_layer_norms

VOCAB = 97  # padded to 128: the padding columns must never be chosen
CONFIGS = {
    "gla": dict(attn="gla"),
    "deltanet": dict(attn="deltanet"),
    "gated_deltanet": dict(attn="gated_deltanet"),
    "softmax": dict(attn="softmax"),
    # Every kind in one stack, per-layer key widths, one layer without a short conv; learned positions.
    "hybrid": dict(n_layer=4, attn=("gated_deltanet", "gla", "softmax", "deltanet"),
                   expand_k=(1.0, 0.5, 1.0, 1.0), conv_size=(4, 0, 4, 3)),
    "depth_adaptive": dict(attn="gla", expand_k=(0.5, 1.0)),
    # The two ways a row ignores its padding (a recurrence restart, a masked KV cache) in two layers.
    "recurrent_and_softmax": dict(attn=("gated_deltanet", "softmax")),
}


@functools.lru_cache(maxsize=None)
def tiny_model(name, **overrides):
    fields = dict(vocab_size=VOCAB, vocab_multiple=32, block_size=128, n_layer=2, n_head=2, n_embd=64,
                  dtype="float32") | CONFIGS[name] | overrides
    return GPT(ModelConfig(**fields), rngs=nnx.Rngs(0))


def random_tokens(seed, shape):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, VOCAB), np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "chunk", "stepping"))
def _teacher_forced(graphdef, params, head, tokens, *, prompt_len, chunk, stepping=None, step_params=None):
    """Logits at positions prompt_len - 1 .. T - 1: prefill of the first prompt_len tokens (left-padded
    to a multiple of `chunk`), then one decode step per further token, through the model `stepping` and
    `step_params` describe when given (the same weights, decoding another way)."""
    model = nnx.merge(graphdef, params)
    step_model = model if stepping is None else nnx.merge(stepping, step_params)
    length = -(-prompt_len // chunk) * chunk
    padded = jnp.zeros((tokens.shape[0], length), jnp.int32).at[:, length - prompt_len:].set(tokens[:, :prompt_len])
    start = jnp.full((tokens.shape[0],), length - prompt_len, jnp.int32)
    cache = init_cache(model, start, length + tokens.shape[1])
    first, cache = prefill(model, head, padded, cache, chunk=chunk, padded=length > prompt_len)

    def step(cache, token):
        logits, cache = decode_step(step_model, head, token, cache)
        return cache, logits

    _, rest = jax.lax.scan(step, cache, tokens[:, prompt_len:].T)
    return jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)


# The fast tier keeps GLA at the 37-token prompt; the other kinds and stacks run with the slow tests.
FAST_PREFILL_CASES = {("gla", 37)}


@pytest.mark.parametrize("name,prompt_len,chunk", [
    pytest.param(name, prompt_len, 16, marks=() if (name, prompt_len) in FAST_PREFILL_CASES else pytest.mark.slow)
    for prompt_len in (1, 37) for name in CONFIGS])
def test_prefill_and_decode_match_the_full_forward(name, prompt_len, chunk):
    model = tiny_model(name)
    tokens = random_tokens(1, (2, 70))
    full = np.asarray(model(jnp.asarray(tokens)))
    generator = Generator(model)
    got = _teacher_forced(generator.graphdef, generator.params, generator.head, jnp.asarray(tokens),
                          prompt_len=prompt_len, chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), full[:, prompt_len - 1:], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name,rows,mlp_impl", [pytest.param("gla", 2, "pallas", marks=pytest.mark.slow),
                                                ("hybrid", 1, "pallas"), ("hybrid", 1, "xla")])
def test_steps_in_the_fused_kernels_continue_the_full_forward(name, rows, mlp_impl):
    """Interpret mode, impl="pallas": every recurrent layer with a short conv decodes in kernels.decode_step,
    and with the MLP's kernels allowed, at one row every block's MLP in kernels.decode_mlp. The hybrid's
    conv-less GLA layer and its softmax layer keep their own ops. LayerNorms away from the identity, so that
    each block's own are the ones used."""
    model = random_layer_norms(tiny_model(name), seed=rows)
    tokens = jnp.asarray(random_tokens(11, (rows, 24)))
    prepared = nnx.clone(model)
    kernel_layers = lambda m: [block.attn for block in m.h if getattr(block.attn, "conv", None) is not None]
    for layer in kernel_layers(prepared):
        layer.impl = "pallas"
    for block in prepared.h:
        block.mlp.decode_impl = mlp_impl
    fused = for_decoding(prepared)  # c_fc stored as the MLP kernel reads it, where that may run
    decoding = nnx.clone(fused)
    for layer in kernel_layers(decoding):
        layer.impl = "auto"  # the prompt in XLA's ops (the Pallas prefill has a test of its own)
    kernel_layers = kernel_layers(fused)
    head = model.wte[...]
    cache = init_cache(decoding, jnp.zeros(rows, jnp.int32), 24)
    traced = jax.make_jaxpr(lambda token, cache: decode_step(fused, head, token, cache))(tokens[:, 0], cache)
    kernels = [eqn.params["name"] for eqn in traced.jaxpr.eqns if eqn.primitive.name == "pallas_call"]
    assert len(kernel_layers) > 0
    assert sum(kernel.endswith("_decode_step") for kernel in kernels) == len(kernel_layers)
    mlp_kernels = len(fused.h) if mlp_impl == "pallas" and rows == 1 else 0
    assert kernels.count("decode_mlp") == mlp_kernels and len(kernels) == len(kernel_layers) + mlp_kernels
    stepping, step_params = nnx.split(fused)
    got = _teacher_forced(*nnx.split(decoding), head, tokens, prompt_len=9, chunk=16, stepping=stepping,
                          step_params=step_params)
    full = np.asarray(model(tokens))
    np.testing.assert_allclose(np.asarray(got), full[:, 8:], atol=2e-5, rtol=2e-5)


def _greedy_by_full_forwards(model, prompt, n):
    """nanoGPT's sampling loop: the whole sequence again for every token (a fixed buffer, causal)."""
    forward = jax.jit(lambda tokens: model(tokens))
    buffer = np.zeros((1, len(prompt) + n), np.int32)
    buffer[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        buffer[0, t] = int(np.argmax(np.asarray(forward(buffer))[0, t - 1, :VOCAB]))
    return buffer[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["gla", pytest.param("hybrid", marks=pytest.mark.slow)])
def test_greedy_generation_is_argmax_of_repeated_full_forwards(name):
    model = tiny_model(name)
    prompt = random_tokens(2, (5,)).tolist()
    got = generate(model, [prompt], max_new_tokens=6, stop_tokens=())
    assert got == [_greedy_by_full_forwards(model, prompt, 6)]


@pytest.mark.parametrize("name", ["recurrent_and_softmax"])
@pytest.mark.parametrize("sampling", [pytest.param(GREEDY, marks=pytest.mark.slow),
                                      Sampling(temperature=1.0, top_k=20, top_p=0.9)], ids=["greedy", "sampled"])
def test_a_batch_of_prompts_gives_each_prompt_its_solo_output(name, sampling):
    model = tiny_model(name)
    generator = Generator(model)
    # With a 16-token prefill chunk the short prompts' rows begin with whole chunks of padding.
    prompts = [random_tokens(3, (3,)).tolist(), random_tokens(4, (45,)).tolist(), random_tokens(5, (1,)).tolist()]
    options = dict(max_new_tokens=5, sampling=sampling, seed=7, num_samples=2, stop_tokens=(), prefill_chunk=16)
    batch = generator.generate(prompts, **options)
    for i, prompt in enumerate(prompts):
        assert batch[2 * i: 2 * i + 2] == generator.generate([prompt], **options), f"prompt {i}"
    if not sampling.greedy:
        assert batch[0] != batch[1] or batch[2] != batch[3]  # a prompt's samples differ


def test_blocks_stop_tokens_and_stop_callbacks():
    generator = Generator(tiny_model("gla"))
    prompt = random_tokens(6, (4,)).tolist()
    whole = generator.generate([prompt], max_new_tokens=9, stop_tokens=())[0]
    streamed = []
    in_blocks = generator.generate([prompt], max_new_tokens=9, stop_tokens=(), block=2,
                                   on_tokens=lambda new: streamed.extend(new[0]))
    assert in_blocks[0] == whole == streamed
    stop_at = whole.index(whole[4])  # the first occurrence of the fifth token
    assert generator.generate([prompt], max_new_tokens=9, stop_tokens=(whole[4],))[0] == whole[:stop_at]
    # A stop callback is checked between blocks: the block that triggers it is kept whole.
    stopped = generator.generate([prompt], max_new_tokens=9, stop_tokens=(), block=3,
                                 stop=lambda row, tokens: len(tokens) >= 4)
    assert stopped[0] == whole[:6]


@pytest.mark.parametrize("name", ["gla", "gated_deltanet"])
def test_decoding_stores_each_layers_joined_kernel_once(name):
    model = tiny_model(name)
    decoding = for_decoding(model)
    attn, original = decoding.h[0].attn, model.h[0].attn
    names = ["q_proj", "k_proj", "v_proj", *(["gk_down"] if name == "gla" else ["b_proj", "a_proj"]), "g_proj"]
    assert attn.joined_kernel.names == tuple(names)
    expected = jnp.concatenate([getattr(original, n).kernel[...] for n in names], axis=1)
    np.testing.assert_array_equal(attn.joined_kernel[...], expected.astype(attn.joined_kernel[...].dtype))
    assert not any(hasattr(getattr(attn, n), "kernel") for n in names)  # read once a step, stored once
    fp8_attn = for_decoding(tiny_model(name, matmul_precision="fp8")).h[0].attn
    assert fp8_attn.joined_kernel.names == tuple(names[:-1])  # the gate's FP8 product keeps its own scales


def test_decoding_stores_c_fc_output_major_where_the_mlp_kernel_reads_it():
    """c_fc's kernel transposed, as kernels.decode_mlp reads it, where the MLP may decode in it (its decode_impl
    not "xla", not in FP8); c_proj's as training stores it."""
    model = tiny_model("recurrent_and_softmax")
    for block, original in zip(for_decoding(model).h, model.h):
        np.testing.assert_array_equal(block.mlp.fc_by_output[...], original.mlp.c_fc.kernel[...].T)
        assert not hasattr(block.mlp.c_fc, "kernel") and hasattr(block.mlp.c_proj, "kernel")
    for overrides in (dict(mlp_impl="xla"), dict(matmul_precision="fp8")):
        mlp = for_decoding(tiny_model("gla", **overrides)).h[0].mlp
        assert not hasattr(mlp, "fc_by_output") and hasattr(mlp.c_fc, "kernel")


def test_an_fp8_model_computes_from_its_stored_joined_kernel_as_from_its_projections():
    model = tiny_model("gated_deltanet", matmul_precision="fp8")
    cast_only = nnx.clone(model)
    for _, module in nnx.iter_graph(cast_only):
        if isinstance(module, nnx.Linear):
            module.kernel.set_value(module.kernel.get_value().astype(module.dtype))
    tokens = jnp.asarray(random_tokens(2, (2, 9)))
    np.testing.assert_array_equal(np.asarray(for_decoding(model)(tokens)), np.asarray(cast_only(tokens)))


def test_a_lone_prompt_of_a_recurrent_model_decodes_beside_a_stopped_copy():
    gla, softmax = Generator(tiny_model("gla")), Generator(tiny_model("softmax"))
    gla.min_decode_rows = softmax.min_decode_rows = MIN_DECODE_ROWS  # as on a GPU
    assert (gla.decode_rows(1), gla.decode_rows(3), softmax.decode_rows(1)) == (2, 3, 1)
    prompt = random_tokens(10, (5,)).tolist()
    blocks = []
    alone = gla.generate([prompt], max_new_tokens=6, stop_tokens=(), block=3, on_tokens=blocks.append)
    assert [len(block) for block in blocks] == [1, 1]  # the copy's tokens are never reported
    assert alone == [gla.generate([prompt, prompt], max_new_tokens=6, stop_tokens=())[0]]


def test_the_exhaustive_autotune_decodes_the_same_tokens():
    """It only widens XLA's GPU autotuning of the products (other backends ignore it)."""
    model = tiny_model("gla")
    prompts = [random_tokens(12, (9,)).tolist(), random_tokens(13, (4,)).tolist()]
    tuned, plain = Generator(model, exhaustive_autotune=True), Generator(model)
    assert (tuned.decode_steps, plain.decode_steps) == (decode_block_autotuned, decode_block)
    assert tuned.generate(prompts, max_new_tokens=5) == plain.generate(prompts, max_new_tokens=5)


def test_rows_stop_in_different_blocks_and_generation_ends_with_the_last():
    generator = Generator(tiny_model("gla"))
    prompts = [random_tokens(7, (4,)).tolist(), random_tokens(8, (6,)).tolist()]
    whole = generator.generate(prompts, max_new_tokens=20, stop_tokens=())
    blocks = []
    stopped = generator.generate(prompts, max_new_tokens=20, stop_tokens=(), block=2, on_tokens=blocks.append,
                                 stop=lambda row, tokens: len(tokens) >= (2 if row == 0 else 5))
    assert stopped == [whole[0][:2], whole[1][:6]]
    assert len(blocks) == 3 and blocks[1][0] == blocks[2][0] == []  # row 0 done after the first block


def test_sampled_tokens_do_not_depend_on_the_blocks():
    generator = Generator(tiny_model("gla"))
    prompt = random_tokens(9, (5,)).tolist()
    options = dict(max_new_tokens=40, sampling=Sampling(temperature=1.0), seed=3, stop_tokens=())
    default = generator.generate([prompt], **options)  # blocks of DEFAULT_BLOCK = 32, then 8 of a second one
    assert generator.generate([prompt], block=40, **options) == default
    assert generator.generate([prompt], block=7, **options) == default


def test_sampling_rules():
    logits = jax.random.normal(jax.random.key(0), (4, 128)) * 3
    keys = row_keys(0, range(4))
    best = np.asarray(jnp.argmax(logits[:, :VOCAB], axis=-1))
    for rule in (GREEDY, Sampling(top_k=1), Sampling(top_p=1e-6)):
        np.testing.assert_array_equal(sample(logits, keys, 0, rule, VOCAB), best)
    tokens = jnp.stack([sample(logits, keys, step, Sampling(temperature=2.0), VOCAB) for step in range(50)])
    assert int(tokens.max()) < VOCAB and len(np.unique(tokens)) > 10
    top3 = np.argsort(-np.asarray(logits[:, :VOCAB]), axis=-1)[:, :3]
    for step in range(20):
        chosen = np.asarray(sample(logits, keys, step, Sampling(top_k=3), VOCAB))
        assert all(chosen[r] in top3[r] for r in range(4))
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_bad_requests_fail_before_any_work():
    softmax = Generator(tiny_model("softmax"))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        softmax.generate([[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="block_size=128"):
        softmax.generate([[1] * 120], max_new_tokens=10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        softmax.generate([[VOCAB]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        softmax.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="block must be >= 1"):
        softmax.generate([[1]], max_new_tokens=2, block=0)


def test_a_last_block_past_the_cache_and_the_positions_changes_nothing():
    """100 + 28 tokens fill block_size=128 and the KV cache; blocks of 5 run 2 steps past both."""
    softmax = Generator(tiny_model("softmax"))
    prompt = random_tokens(5, (100,)).tolist()
    whole = softmax.generate([prompt], max_new_tokens=28, stop_tokens=())[0]
    assert softmax.generate([prompt], max_new_tokens=28, stop_tokens=(), block=5)[0] == whole
    assert len(whole) == 28


def test_positions_past_the_embedding_stay_finite():
    """The steps a last block runs past block_size read real positions (an unclipped take gives NaN)."""
    model = tiny_model("softmax")
    cache = init_cache(model, jnp.zeros(1, jnp.int32), 132) | {"length": jnp.int32(126)}
    h, _ = forward(model, jnp.asarray([[1, 2, 3, 4]]), cache)  # positions 126..129 of 128
    assert bool(jnp.all(jnp.isfinite(h)))


def test_recurrent_models_generate_past_their_training_context():
    model = tiny_model("gla")
    prompt = random_tokens(8, (120,)).tolist()
    assert len(generate(model, [prompt], max_new_tokens=20, stop_tokens=())[0]) == 20


def test_prompt_length_buckets():
    assert [prompt_length_bucket(n, 64) for n in (1, 16, 17, 64, 65, 200)] == [16, 16, 32, 64, 128, 256]


@pytest.mark.slow  # about 20 s of interpreted kernels on 2 cores
def test_prefill_through_the_pallas_kernels_gives_the_reference_state():
    """Interpret mode: the chunked-prefill state of every recurrent kind, padding included."""
    tokens = random_tokens(9, (2, 32))
    start = jnp.array([0, 11], jnp.int32)
    states = {}
    for impl in ("pallas", "reference"):
        model = tiny_model("hybrid", impl=impl, n_layer=3, attn=("gla", "deltanet", "gated_deltanet"),
                           expand_k=1.0, conv_size=4)
        generator = Generator(model)
        logits, cache = _prefill_state(generator.graphdef, generator.params, generator.head, jnp.asarray(tokens),
                                       start)
        states[impl] = logits, [{key: state[key] for key in ("recurrent", "conv")} for state in cache["layers"]]
    for got, want in zip(jax.tree.leaves(states["pallas"]), jax.tree.leaves(states["reference"])):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@functools.partial(jax.jit, static_argnames="graphdef")
def _prefill_state(graphdef, params, head, tokens, start):
    model = nnx.merge(graphdef, params)
    return prefill(model, head, tokens, init_cache(model, start, 0), chunk=16)
