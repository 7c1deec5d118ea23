"""Loss by position on long documents: windows, buckets, one-pass scoring against plain forwards."""

import functools
import json
import math
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin import export
from jaxlin.eval import long_ppl
from jaxlin.eval.plot_long_ppl import main as plot_main
from jaxlin.eval.scoring import Scorer
from tests.eval.eval_helpers import BLOCK, tiny_model

REPO = Path(__file__).resolve().parents[2]
WINDOW = 96  # longer than the tiny model's block size, not a multiple of its chunks


def test_position_buckets_double_from_the_first():
    assert long_ppl.position_buckets(16384) == [(0, 1024), (1024, 2048), (2048, 4096), (4096, 8192), (8192, 16384)]
    assert long_ppl.position_buckets(5000) == [(0, 1024), (1024, 2048), (2048, 4096), (4096, 5000)]
    assert long_ppl.position_buckets(48, first=8) == [(0, 8), (8, 16), (16, 32), (32, 48)]
    assert long_ppl.position_buckets(500) == [(0, 500)]
    assert [long_ppl.bucket_name(*b) for b in long_ppl.position_buckets(32768)] == \
        ["0-1k", "1k-2k", "2k-4k", "4k-8k", "8k-16k", "16k-32k"]
    assert long_ppl.bucket_name(32, 48) == "32-48"


def test_windows_are_consecutive_and_predict_each_token_once():
    windows = long_ppl.cut_windows(list(range(20)), 6)
    assert windows.tolist() == [list(range(0, 7)), list(range(6, 13)), list(range(12, 19))]  # token 19 dropped
    assert long_ppl.cut_windows(list(range(19)), 6).shape == (3, 7)
    assert long_ppl.cut_windows(list(range(6)), 6).shape == (0, 7)


def test_summary_averages_positions_per_bucket():
    nll_sum = np.arange(12, dtype=np.float64) * 2  # two windows: position p lost p on average
    got = long_ppl.summarize(nll_sum, 2, first=2)
    assert [(b["positions"], b["loss"], b["tokens"]) for b in got["buckets"]] == \
        [("0-2", 0.5, 4), ("2-4", 2.5, 4), ("4-8", 5.5, 8), ("8-12", 9.5, 8)]
    assert got["loss"] == 5.5 and got["perplexity"] == pytest.approx(math.exp(5.5))
    curve = got["curve"]  # log-spaced ranges covering every position once
    assert curve["start"][0] == 0 and curve["end"][-1] == 12 and curve["start"][1:] == curve["end"][:-1]
    assert curve["loss"] == [(a + b - 1) / 2 for a, b in zip(curve["start"], curve["end"])]
    assert len(long_ppl.summarize(np.ones(16384), 1)["curve"]["loss"]) <= long_ppl.CURVE_POINTS


class SpaceSeparatedIds:
    """A stand-in tokenizer: documents are written as token ids separated by spaces."""

    @staticmethod
    def encode_ordinary(text):
        return [int(t) for t in text.split()]


def _documents(tmp_path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50257, n).tolist() for n in lengths]
    for i, doc in enumerate(docs):
        (tmp_path / f"book{i}.txt").write_text(" ".join(map(str, doc)))
    (tmp_path / "notes.md").write_text("not a document")
    return docs


@functools.partial(jax.jit, static_argnums=(0, 3))
def _log_probs(graphdef, params, tokens, split):
    """log-softmax over [T] tokens in one forward, or (split > 0) in two continuing a carried state."""
    model = nnx.merge(graphdef, params)
    if not split:
        return jax.nn.log_softmax(model(tokens[None])[0], axis=-1)
    first, state = model(tokens[None, :split], return_state=True)
    rest = model(tokens[None, split:], state=state)
    return jax.nn.log_softmax(jnp.concatenate([first, rest], axis=1)[0], axis=-1)


def _full_forward_nll(model, window, split=0):
    log_probs = np.asarray(_log_probs(*nnx.split(model), jnp.asarray(window[:-1]), split))
    return -log_probs[np.arange(len(window) - 1), window[1:]]


def test_recurrent_window_in_one_pass_equals_the_full_forward(tmp_path):
    model = tiny_model("gla")
    docs = _documents(tmp_path, [2 * WINDOW + 10, WINDOW + 1, WINDOW - 5])  # 2 + 1 + 0 windows
    scorer = Scorer(model, batch_size=3, progress=False)  # 3 * 64 // 96 = 2 windows per pass: one padded batch
    got = long_ppl.evaluate(scorer, SpaceSeparatedIds(), [tmp_path], None, window=WINDOW, first_bucket=16)
    windows = [np.asarray(doc[i * WINDOW : (i + 1) * WINDOW + 1]) for doc, n in zip(docs, (2, 1, 0))
               for i in range(n)]
    reference = np.stack([_full_forward_nll(model, w) for w in windows])
    assert got["window"] == WINDOW and "note" not in got and got["samples"] == 3 and got["tokens"] == 3 * WINDOW
    assert got["documents"] == {"book0.txt": 2 * WINDOW + 10, "book1.txt": WINDOW + 1, "book2.txt": WINDOW - 5}
    assert got["loss"] * got["tokens"] == pytest.approx(reference.sum(), rel=1e-5)
    for bucket in got["buckets"]:
        assert bucket["loss"] == pytest.approx(reference[:, bucket["start"] : bucket["end"]].mean(), rel=1e-5)
    assert [b["positions"] for b in got["buckets"]] == ["0-16", "16-32", "32-64", "64-96"]

    # The same window continued from a carried state, in two pieces, gives the same losses.
    np.testing.assert_allclose(_full_forward_nll(model, windows[0], split=40), reference[0], rtol=1e-4, atol=1e-4)

    limited = long_ppl.evaluate(scorer, SpaceSeparatedIds(), [tmp_path], 1, window=WINDOW, first_bucket=16)
    assert limited["samples"] == 1 and limited["loss"] == pytest.approx(reference[0].mean(), rel=1e-5)


def test_learned_positions_cut_the_window_to_the_block_size(tmp_path):
    model = tiny_model("softmax")
    docs = _documents(tmp_path, [3 * BLOCK])
    got = long_ppl.evaluate(Scorer(model, progress=False), SpaceSeparatedIds(), [tmp_path], None, window=WINDOW)
    assert got["window"] == BLOCK and got["requested_window"] == WINDOW and got["samples"] == 2
    assert "learned positions end at block_size=64" in got["note"]
    reference = np.stack([_full_forward_nll(model, np.asarray(docs[0][i * BLOCK : (i + 1) * BLOCK + 1]))
                          for i in range(2)])
    assert got["loss"] == pytest.approx(reference.mean(), rel=1e-5)


def test_folders_without_documents_are_named(tmp_path):
    with pytest.raises(ValueError, match="no .txt files in"):
        long_ppl.list_documents(tmp_path)
    with pytest.raises(ValueError, match="does not exist; give --long_docs DIR"):
        long_ppl.list_documents(tmp_path / "nowhere")
    _documents(tmp_path, [10])
    with pytest.raises(ValueError, match="has the 97 tokens one window needs; lower --long_ppl_len"):
        long_ppl.evaluate(Scorer(tiny_model("gla"), progress=False), SpaceSeparatedIds(), [tmp_path], None,
                          window=WINDOW)


@pytest.mark.slow
def test_cli_prints_buckets_writes_json_and_plots(tmp_path, data_dir, capsys):
    export.save(tiny_model("gla"), tmp_path / "gla" / "export")
    export.save(tiny_model("softmax"), tmp_path / "softmax" / "export")
    books = tmp_path / "books"
    books.mkdir()
    (books / "story.txt").write_text("The lighthouse keeper counted the ships every night. " * 60)  # ~600 tokens
    main = runpy.run_path(str(REPO / "eval.py"))["main"]
    for name in ("gla", "softmax"):
        main(["--model", str(tmp_path / name / "export"), "--tasks", "long_ppl", "--long_docs", str(books),
              "--long_ppl_len", str(WINDOW), "--output", str(tmp_path / f"{name}.json"), "--data_dir", str(data_dir),
              "--no_progress"])
    out = capsys.readouterr().out
    assert "long_ppl       loss 0-96" in out and "learned positions end at block_size=64" in out
    assert (tmp_path / "gla.long_ppl.png").stat().st_size > 0
    report = json.loads((tmp_path / "gla.json").read_text())
    assert report["results"]["long_ppl"]["window"] == WINDOW and report["settings"]["long_ppl_len"] == WINDOW
    plot_main(["--out", str(tmp_path / "both.png"), f"GLA={tmp_path / 'gla.json'}",
               f"softmax={tmp_path / 'softmax.json'}"])
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        plot_main(["--out", str(tmp_path / "x.png"), f"GLA={tmp_path / 'missing.json'}"])
