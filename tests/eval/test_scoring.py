"""The batched scorer against the plain per-request reference, and state reuse against full sequences."""

import jax
import numpy as np
import pytest
from jaxlin.eval import scoring
from jaxlin.eval.scoring import Scorer, bucket_lengths
from tests.eval.eval_helpers import BLOCK, reference_log_probs, reference_loglikelihood, tiny_model


def random_tokens(rng, n):
    return [int(t) for t in rng.integers(0, 50257, n)]


def test_bucket_lengths_are_powers_of_two_up_to_the_context():
    assert bucket_lengths(64) == [32, 64]
    assert bucket_lengths(1000) == [32, 64, 128, 256, 512, 1000]


@pytest.mark.parametrize("attn", ["gla", "softmax"])
def test_reference_padding_is_causal(attn):
    tokens = random_tokens(np.random.default_rng(1), 11)
    model = tiny_model(attn)
    np.testing.assert_array_equal(reference_log_probs(model, tokens, pad=0), reference_log_probs(model, tokens, pad=7))


@pytest.mark.parametrize("attn", ["gla", "softmax"])
def test_loglikelihood_matches_the_reference(attn):
    model = tiny_model(attn)
    rng = np.random.default_rng(0)
    # Short and long requests: the longest exceed the window and are cut on the left.
    requests = [(random_tokens(rng, n), random_tokens(rng, k)) for n, k in
                [(1, 1), (3, 5), (4, 2), (60, 4), (80, 3), (5, BLOCK), (50, 10)]]
    model_greedy = [random_tokens(rng, 6)]
    model_greedy.append([int(np.argmax(reference_log_probs(model, model_greedy[0])[-1]))])
    requests.append(tuple(model_greedy))  # a one-token continuation that is the argmax
    got = Scorer(model, batch_size=4, progress=False).loglikelihood(requests)
    for (ll, greedy), (context, continuation) in zip(got, requests):
        want_ll, want_greedy = reference_loglikelihood(model, context, continuation)
        assert ll == pytest.approx(want_ll, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    assert got[-1][1]


def choice_groups(rng, n_groups=12):
    """Questions with a shared context each; lengths vary so left padding and several batches occur
    (and stay within one bucket, to compile little)."""
    groups = []
    for g in range(n_groups):
        context = random_tokens(rng, 1 + (3 * g) % 4)
        groups.append([(context, random_tokens(rng, 1 + (g + j) % 5)) for j in range(2 + g % 3)])
    return groups


@pytest.mark.parametrize("attn", ["gla", pytest.param("gated_deltanet", marks=pytest.mark.slow)])
def test_state_reuse_gives_the_full_sequence_scores(attn):
    model = tiny_model(attn)
    groups = choice_groups(np.random.default_rng(2))
    scorer = Scorer(model, batch_size=4, progress=False)
    assert scorer.reuses_state
    reused = scorer.choice_loglikelihoods(groups)
    scorer.reuses_state = False
    full = scorer.choice_loglikelihoods(groups)
    np.testing.assert_allclose(np.concatenate(reused), np.concatenate(full), rtol=1e-5, atol=1e-5)
    if attn == "gla":
        reference = [reference_loglikelihood(model, c, x)[0] for group in groups for c, x in group]
        np.testing.assert_allclose(np.concatenate(reused), reference, rtol=1e-5, atol=1e-5)


def test_continuations_compile_once_per_shape_whatever_the_context_batch(gla, monkeypatch):
    traced, original = [], scoring._extend.__wrapped__

    def extend(graphdef, params, state, first_logits, tokens):
        traced.append(tokens.shape)
        return original(graphdef, params, state, first_logits, tokens)

    monkeypatch.setattr(scoring, "_extend", jax.jit(extend, static_argnums=0))
    rng = np.random.default_rng(4)
    # Contexts in two length buckets (prefill batches of 4 x 64 and 8 x 32), continuations in one.
    contexts = [random_tokens(rng, n) for n in (40, 40, 5, 5, 5)]
    groups = [[(context, random_tokens(rng, 3)) for _ in range(2)] for context in contexts]
    Scorer(gla, batch_size=4, progress=False).choice_loglikelihoods(groups)
    assert traced == [(8, 32)]


def test_choices_that_do_not_fit_or_differ_in_context_use_full_sequences(gla):
    rng = np.random.default_rng(3)
    context = random_tokens(rng, 60)
    groups = [[(context, random_tokens(rng, 8)), (context, random_tokens(rng, 3))],  # 67 > 64 tokens: cut
              [(random_tokens(rng, 5), [11]), (random_tokens(rng, 4), [11])]]  # winogrande-style contexts
    got = Scorer(gla, batch_size=4, progress=False).choice_loglikelihoods(groups)
    want = [[reference_loglikelihood(gla, c, x)[0] for c, x in group] for group in groups]
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=1e-5, atol=1e-5)


def test_softmax_model_scores_full_sequences_within_its_positions():
    model = tiny_model("softmax")
    assert not Scorer(model, progress=False).reuses_state
    with pytest.raises(ValueError, match="exceeds the model's position embedding"):
        Scorer(model, max_len=2 * BLOCK)


def test_recurrent_model_with_positions_does_not_reuse_state():
    model = tiny_model("gla", pos_embedding=True)
    assert not Scorer(model, progress=False).reuses_state


@pytest.mark.parametrize("bad, message", [((([], [5]),), "empty context"), ((([5], []),), "continuation of 0")])
def test_requests_that_cannot_be_scored_fail_before_any_work(gla, monkeypatch, bad, message):
    def no_work(*args):
        raise AssertionError("a model function ran")

    for name in ("_full_scores", "_prefill", "_extend"):
        monkeypatch.setattr(scoring, name, no_work)
    scorer = Scorer(gla, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=message):
        scorer.loglikelihood([([1, 2], [3])] + list(bad))
    with pytest.raises(ValueError, match=message):  # the shared-context path too
        scorer.choice_loglikelihoods([[([1, 2], [3]), ([1, 2], [4])], list(bad) * 2])
