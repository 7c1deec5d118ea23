"""The analytic FLOP count: softmax layers' attention is counted and grows with T, the recurrences' does not."""

from flax import nnx

from jaxlin.model import GPT, ModelConfig
from jaxlin.train import flops


def gpt2_medium(attn):
    config = ModelConfig(n_layer=24, n_head=16, n_embd=1024, attn=attn, block_size=16384)
    params = nnx.state(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))), nnx.Param)
    return config, flops.count_matrix_params(params, config.uses_pos_embedding, config.block_size, config.n_embd)


def test_softmax_counts_attention_as_nanogpt():
    config, n = gpt2_medium("softmax")
    for T in (1024, 16384):
        # nanoGPT's estimate_mfu: 6 N + 12 L d T per token (q k^T and p v over the full T x T square).
        assert flops.train_flops_per_token(config, n, T) == 6 * n + 12 * 24 * 1024 * T


def test_softmax_attention_dominates_at_long_context_and_recurrences_stay_flat():
    softmax, n_softmax = gpt2_medium("softmax")
    gla, n_gla = gpt2_medium("gla")
    assert flops.train_flops_per_token(softmax, n_softmax, 16384) > 2.5 * flops.train_flops_per_token(
        softmax, n_softmax, 1024)
    assert flops.train_flops_per_token(gla, n_gla, 16384) == flops.train_flops_per_token(gla, n_gla, 1024)
