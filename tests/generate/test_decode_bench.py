"""A CPU smoke run of the decode benchmark at tiny shapes."""

import json
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.bench import decode
from jaxlin.generate import init_cache
from jaxlin.model import GPT


@pytest.mark.slow
def test_tiny_rows_report_every_column_and_the_json(tmp_path, capsys):
    out = tmp_path / "decode.json"
    rows = decode.main(["--tiny", "--models", "gla,softmax", "--batch", "2", "--context", "32", "--new_tokens", "2",
                        "--prefill_chunk", "16", "--naive_check", "32", "--json", str(out),
                        "--profile", str(tmp_path / "profile")])
    assert [(r["model"], r["batch"], r["context"]) for r in rows] == [("gla", 2, 32), ("softmax", 2, 32)]
    for row in rows:
        assert "note" not in row
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and 0 < row["bound_fraction"] < 1
        assert row["state_mib"] > 0 and row["speedup_vs_naive"] > 0 and row["naive_measured_ms"] > 0
        assert row["prefill_logits_difference"] < 1e-4  # float32: the prefill is the full forward
        assert {"kernels", "categories", "total_ms", "idle_ms"} <= set(row["profile"])  # CPU traces hold no kernels
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["gla_b2_32", "softmax_b2_32"]
    # The KV cache: keys and values of 2 layers, 2 rows, context + warm-up, three timed and one profiled
    # block (and a few counters).
    kv_bytes = 2 * 2 * 2 * (32 + 5 * 2) * 64 * 4
    assert 0 <= rows[1]["state_mib"] * 2**20 - kv_bytes < 64
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    table = capsys.readouterr().out
    assert "% bound" in table and "naive ms" in table


def test_rows_past_the_time_budget_are_skipped_with_a_note():
    rows = decode.main(["--tiny", "--models", "gla", "--batch", "1", "--context", "16", "--time_budget", "0"])
    assert [(r["model"], r["batch"], r["context"], r["note"]) for r in rows] == [("gla", 1, 16, "skipped: time budget")]


def test_a_model_whose_compile_ends_past_the_budget_still_runs_its_first_row(monkeypatch):
    compile_shapes, skipped = decode.compile_shapes, [0.0]
    # The clock jumps past the budget while the model compiles.
    monkeypatch.setattr(decode, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0]))

    def slow_compile(*args):
        compiled = compile_shapes(*args)
        skipped[0] = 1000.0
        return compiled

    monkeypatch.setattr(decode, "compile_shapes", slow_compile)
    rows = decode.main(["--tiny", "--models", "gla", "--batch", "1", "--context", "16,32", "--new_tokens", "2",
                        "--prefill_chunk", "16", "--naive_check", "0", "--time_budget", "100"])
    assert "note" not in rows[0] and rows[0]["decode_tok_s"] > 0
    assert rows[1]["note"] == "skipped: time budget"


def test_a_decode_only_state_counts_the_context_as_written_in_every_kv_cache():
    model = GPT(decode.model_config("softmax", 64, tiny=True), rngs=nnx.Rngs(0))
    cache = decode.as_written(init_cache(model, jnp.zeros((1,), jnp.int32), 48), 40)
    assert int(cache["length"]) == 40 and [int(layer["length"]) for layer in cache["layers"]] == [40, 40]
    assert not any(np.asarray(layer["k"]).any() for layer in cache["layers"])


def test_decode_only_rows_time_decoding_from_an_empty_state_of_the_context(tmp_path, monkeypatch):
    """With --mlp_impl xla each model is built with XLA's MLP, as the JSON records."""
    built = []
    generator = decode.Generator
    monkeypatch.setattr(decode, "Generator",
                        lambda model, **kw: built.append(model.config.mlp_impl) or generator(model, **kw))
    out = tmp_path / "decode.json"
    rows = decode.main(["--tiny", "--models", "gla,softmax", "--batch", "1", "--context", "24", "--new_tokens", "2",
                        "--repeats", "2", "--prefill_chunk", "16", "--decode_only", "--mlp_impl", "xla",
                        "--json", str(out)])  # no prefill: any context
    for row in rows:
        assert "note" not in row and row["decode_tok_s"] > 0 and 0 < row["bound_fraction"] < 1
        assert not {"prefill_tok_s", "naive_ms_per_token", "speedup_vs_naive", "naive_measured_ms"} & set(row)
    assert built == ["xla", "xla"] and json.loads(out.read_text())["mlp_impl"] == "xla"


def test_the_layers_ops_decode_only(capsys):
    """`--impl reference` prefills in the token scan too (minutes at long contexts): refused without
    --decode_only, before any model is built."""
    with pytest.raises(SystemExit):
        decode.main(["--tiny", "--impl", "reference"])
    assert "add --decode_only" in capsys.readouterr().err


def test_exhaustive_autotune_reaches_the_generator_and_the_json(tmp_path, monkeypatch):
    options = []
    generator = decode.Generator
    monkeypatch.setattr(decode, "Generator", lambda model, **kw: options.append(kw) or generator(model, **kw))
    out = tmp_path / "decode.json"
    rows = decode.main(["--tiny", "--models", "gla", "--batch", "1", "--context", "16", "--new_tokens", "2",
                        "--repeats", "1", "--decode_only", "--exhaustive_autotune", "--json", str(out)])
    assert rows[0]["decode_tok_s"] > 0 and options == [{"exhaustive_autotune": True}]
    assert json.loads(out.read_text())["exhaustive_autotune"] is True
