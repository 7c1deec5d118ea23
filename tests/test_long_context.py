"""Long context: the long-context configs, packing documents at long T, and state resets at every document
start (data.reset_state_at_eot) at lengths of many chunks."""

import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.data.pipeline import make_train_iterator
from jaxlin.data.shards import write_shard
from jaxlin.data.tokenizer import EOT_TOKEN
from jaxlin.model import GPT, ModelConfig
from jaxlin.train.config import model_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name):
    return runpy.run_path(str(CONFIGS / f"{name}.py"))["get_config"]()


@pytest.mark.parametrize("name", ["gpt2_medium_gla_8k", "gpt2_medium_softmax_8k"])
def test_gpt2_medium_8k_configs_keep_the_reference_tokens(name):
    c, reference = load(name), load("gpt2_medium_gla")
    assert c.data.seq_len == 8192 and c.train.micro_batch_size * c.data.seq_len == 32 * 1024
    assert c.train.batch_size * c.data.seq_len == reference.train.batch_size * reference.data.seq_len
    model = model_config(c)
    if model.uses_pos_embedding:
        assert model.block_size >= c.data.seq_len and model.attention_impl == "auto"


def test_small_8k_pair_differs_only_in_attention():
    gla, softmax = load("small_gla_8k"), load("small_softmax_8k")
    assert gla.data.seq_len == softmax.data.seq_len == 8192
    assert model_config(softmax).attn == "softmax" and model_config(softmax).block_size == 8192
    assert (gla.train.to_dict(), gla.data.to_dict()) == (softmax.train.to_dict(), softmax.data.to_dict())


def documents(lengths, seed=0):
    """Tokens of documents of the given lengths, each opened by EOT as llm.c's shards are."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.r_[EOT_TOKEN, rng.integers(0, EOT_TOKEN, n - 1)] for n in lengths])


def test_pipeline_packs_documents_at_long_context(tmp_path):
    T = 8192
    tokens = documents(np.random.default_rng(1).integers(10, 3000, 40))
    shard = write_shard(tmp_path / "train_000000.bin", tokens)
    batch = next(make_train_iterator([shard], T, 2, segment_ids=True, process_index=0, process_count=1))
    inputs, targets, ids = batch["inputs"], batch["targets"], batch["segment_ids"]
    assert inputs.shape == targets.shape == ids.shape == (2, T)
    for row, target, seg in zip(inputs, targets, ids):
        start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 16) == row[:16], 1))[0])
        np.testing.assert_array_equal(row, tokens[start:start + T])  # a contiguous window: documents packed
        np.testing.assert_array_equal(target, tokens[start + 1:start + T + 1])
        np.testing.assert_array_equal(np.diff(seg), (row[1:] == EOT_TOKEN).astype(np.int32))
        assert (row == EOT_TOKEN).sum() >= 3  # several documents per window


@pytest.mark.parametrize("attn", ["gla", pytest.param("gated_deltanet", marks=pytest.mark.slow)])
def test_reset_at_eot_isolates_documents_over_many_chunks(attn):
    """The same documents packed in two orders (one batch, one compile): with segment ids each document's
    hidden states are the same in both, so no state crosses a document start. At a length of many chunks,
    with boundaries off the 64-token chunk grid, for the chunked kernels and the short convs."""
    lengths = [150, 333, 64, 517, 66]  # T = 1130
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=64, attn=attn, dtype="float32", impl="chunked",
                      elementwise_impl="xla", layer_norm_impl="xla", mlp_impl="xla")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    docs = np.split(documents(lengths, seed=2), np.cumsum(lengths)[:-1])
    order = [3, 0, 4, 2, 1]
    tokens = jnp.asarray(np.stack([np.concatenate(docs), np.concatenate([docs[i] for i in order])]))
    ids = jnp.cumsum(tokens == EOT_TOKEN, axis=1, dtype=jnp.int32)
    run = jax.jit(lambda t, s: model.hidden(t, segment_ids=s))
    hidden = np.asarray(run(tokens, ids))
    starts = np.r_[0, np.cumsum(lengths)]
    reordered_starts = dict(zip(order, np.r_[0, np.cumsum([lengths[i] for i in order])]))
    for i, n in enumerate(lengths):
        first = hidden[0, starts[i]:starts[i] + n]
        second = hidden[1, reordered_starts[i]:reordered_starts[i] + n]
        np.testing.assert_allclose(first, second, rtol=2e-4, atol=2e-4, err_msg=f"document {i}")
    # With one id for the whole row the context leaks: the check above can fail.
    leaky = np.asarray(run(tokens, jnp.zeros_like(ids)))
    assert not np.allclose(leaky[0, starts[1]:starts[2]], leaky[1, reordered_starts[1]:reordered_starts[1] + 333],
                           rtol=2e-4, atol=2e-4)
