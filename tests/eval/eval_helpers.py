"""Tiny models and the independent reference scorer that the eval tests compare against."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlin.data.tokenizer import EOT_TOKEN
from jaxlin.model import GPT, ModelConfig

BLOCK = 64


def tiny_config(attn="gla", **overrides) -> ModelConfig:
    fields = dict(n_layer=2, n_head=2, n_embd=64, block_size=BLOCK, attn=attn, dtype="float32")
    return ModelConfig(**{**fields, **overrides})


@functools.lru_cache(maxsize=None)
def tiny_model(attn="gla", seed=0, **overrides) -> GPT:
    """A random model whose weights are drawn with numpy: eager initialisation would compile every
    init op, which costs more than the tests themselves on a small CPU. Weights are larger than a
    training init so that log-likelihoods differ clearly between choices."""
    abstract = nnx.eval_shape(lambda: GPT(tiny_config(attn, **overrides), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    params = []
    for path, variable in nnx.to_flat_state(state):
        shape = variable.get_value().shape
        if path[-1] in ("scale", "weight"):  # norm gains
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif path[-1] == "A_log":
            value = np.log(rng.uniform(1, 16, shape))
        else:
            value = 0.1 * rng.standard_normal(shape)
        params.append((path, variable.replace(jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(params))


@functools.partial(jax.jit, static_argnums=0)
def _padded_log_softmax(graphdef, params, tokens):
    return jax.nn.log_softmax(nnx.merge(graphdef, params)(tokens)[0], axis=-1)


def reference_log_probs(model: GPT, tokens: list[int], pad: int = 0) -> np.ndarray:
    """[len(tokens), padded vocab] log-softmax of the model on `tokens`. The input is padded on the right
    to the block size so that one compilation serves every length (a causal model's outputs do not
    depend on later tokens: test_reference_padding_is_causal checks it)."""
    assert 1 <= len(tokens) <= BLOCK
    padded = np.full((1, BLOCK), pad, np.int32)
    padded[0, : len(tokens)] = tokens
    graphdef, params = nnx.split(model)
    return np.asarray(_padded_log_softmax(graphdef, params, jnp.asarray(padded)))[: len(tokens)]


def reference_loglikelihood(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One request the plain way: the harness's window over context + continuation, one forward,
    then sum log P(token) over the continuation's positions and check each is the argmax."""
    sequence = (context + continuation)[-(BLOCK + 1):]
    log_probs = reference_log_probs(model, sequence[:-1])
    total, greedy = 0.0, True
    for offset in range(len(continuation)):
        position = len(sequence) - 1 - len(continuation) + offset  # predicts sequence[position + 1]
        token = sequence[position + 1]
        total += float(log_probs[position, token])
        greedy &= int(np.argmax(log_probs[position])) == token
    return total, greedy


def harness_rolling_windows(tokens, max_len):
    """lm_eval.utils.get_rolling_token_windows(context_len=1) + make_disjoint_window, restated."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([EOT_TOKEN] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_len)
        end = predicted + n_pred
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[end - n_pred : end]))
        predicted += n_pred
    return [(inp[: len(inp) - len(pred) + 1], pred) for inp, pred in windows]
