"""End to end: every task on a few documents, checked against a plain recomputation of its definition
(one forward per request, no batching, bucketing or state reuse)."""

import hashlib
import json
import math
import re
import runpy
from pathlib import Path

import numpy as np
import pytest

from jaxlin import export
from jaxlin.data.tokenizer import get_tokenizer
from jaxlin.eval import tasks
from jaxlin.eval.runner import run
from jaxlin.model import count_params
from tests.eval.eval_helpers import (BLOCK, harness_rolling_windows, reference_log_probs, reference_loglikelihood,
                                     tiny_model)

pytestmark = pytest.mark.slow  # every test reads one evaluation of every task (the fixture below)

LIMIT = 2
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    return tiny_model("gla")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, data_dir, model):
    root = tmp_path_factory.mktemp("eval")
    export.save(model, root / "export")
    results = run(root / "export", limit=LIMIT, output=root / "results.json", data_dir=data_dir,
                  batch_size=4, progress=False)
    return results, json.loads((root / "results.json").read_text()), root / "export"


def harness_encode(tok, context, continuation):
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
    context_tokens = tok.encode_ordinary(context)
    return context_tokens, tok.encode_ordinary(context + continuation)[len(context_tokens) :]


def test_output_json_has_every_task(evaluated):
    results, written, export_dir = evaluated
    assert written["results"] == results
    assert list(results) == ["wikitext2", "lambada", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                             "boolq", "copa", "openbookqa"]  # the papers' column order
    assert all(r["samples"] == LIMIT for r in results.values())
    assert set(results["hellaswag"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}
    assert set(results["winogrande"]) == set(results["boolq"]) == {"acc", "acc_stderr", "samples"}
    assert {"acc_norm", "acc_norm_stderr"} <= set(results["arc_challenge"]) & set(results["openbookqa"])
    assert set(results["lambada"]) == {"perplexity", "acc", "acc_stderr", "tokens", "samples"}
    assert {"tokens", "words", "bytes"} <= set(results["wikitext2"])
    # The table: one row per metric, headline metric first, n = what the metric averages over.
    rows = [(r["task"], r["metric"]) for r in written["table"]]
    assert rows[:6] == [("wikitext2", "word_perplexity"), ("wikitext2", "token_perplexity"),
                        ("wikitext2", "byte_perplexity"), ("wikitext2", "bits_per_byte"),
                        ("lambada", "perplexity"), ("lambada", "acc")]
    assert rows.index(("hellaswag", "acc_norm")) < rows.index(("hellaswag", "acc"))
    assert rows.index(("arc_challenge", "acc_norm")) < rows.index(("arc_challenge", "acc"))
    by_name = {(r["task"], r["metric"]): r for r in written["table"]}
    assert by_name[("lambada", "perplexity")]["n"] == results["lambada"]["tokens"]
    assert by_name[("wikitext2", "word_perplexity")]["counts"] == "words"
    assert by_name[("copa", "acc")]["stderr"] == results["copa"]["acc_stderr"]
    # What was scored, and by what.
    model = written["model"]
    assert model["path"] == str(export_dir.resolve()) and model["parameters"] == count_params(tiny_model("gla"))
    assert model["config_sha256"] == hashlib.sha256((export_dir / "config.json").read_bytes()).hexdigest()
    assert written["evaluator"]["version"] and re.fullmatch("[0-9a-f]{40}", written["evaluator"]["commit"] or "0" * 40)
    assert written["settings"]["limit"] == LIMIT


def test_wikitext(evaluated, data_dir, model):
    tok = get_tokenizer(data_dir)
    pages = tasks.load_wikitext(data_dir / "wikitext-2-raw/wiki.test.raw").pages[:LIMIT]
    tokens = tok.encode_ordinary("\n".join(pages))
    nll = 0.0
    for start in range(0, len(tokens) - 1, BLOCK):
        window = tokens[start : start + BLOCK + 1]
        log_probs = reference_log_probs(model, window[:-1])
        nll -= sum(float(log_probs[i, t]) for i, t in enumerate(window[1:]))
    total = sum(reference_loglikelihood(model, context, continuation)[0]
                for page in pages
                for context, continuation in harness_rolling_windows(
                    tok.encode_ordinary(tasks.detokenize_wikitext(page)), BLOCK))
    words = sum(len(re.split(r"\s+", page)) for page in pages)
    n_bytes = sum(len(page.encode()) for page in pages)
    got = evaluated[0]["wikitext2"]
    assert got["token_perplexity"] == pytest.approx(math.exp(nll / (len(tokens) - 1)), rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-5)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)


def test_lambada(evaluated, data_dir, model):
    tok = get_tokenizer(data_dir)
    lines = (data_dir / "lambada/lambada_test.jsonl").read_text().splitlines()[:LIMIT]
    scores = []
    for line in lines:
        words = json.loads(line)["text"].split(" ")
        scores.append(reference_loglikelihood(model, *harness_encode(tok, " ".join(words[:-1]), " " + words[-1])))
    got = evaluated[0]["lambada"]
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in scores])), rel=1e-5)
    assert got["acc"] == np.mean([greedy for _, greedy in scores])


LOADERS = {"arc_easy": tasks.load_arc, "hellaswag": tasks.load_hellaswag, "piqa": tasks.load_piqa,
           "winogrande": tasks.load_winogrande, "arc_challenge": tasks.load_arc, "boolq": tasks.load_boolq,
           "copa": tasks.load_copa, "openbookqa": tasks.load_openbookqa}


@pytest.mark.parametrize("task", list(LOADERS))
def test_multiple_choice(evaluated, data_dir, model, task):
    tok = get_tokenizer(data_dir)
    loader = LOADERS[task]
    questions = loader(*tasks.task_files(task, data_dir))[:LIMIT]  # prompts: see test_tasks.py
    acc, acc_norm = [], []
    for q in questions:
        lls = np.array([reference_loglikelihood(model, *harness_encode(tok, c, x))[0] for c, x in q.pairs])
        acc.append(np.argmax(lls) == q.gold)
        acc_norm.append(np.argmax(lls / [len(c) for c in q.choices]) == q.gold)
    got = evaluated[0][task]
    assert got["acc"] == np.mean(acc)
    assert got["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / np.sqrt(len(acc)))
    if task in ("arc_easy", "hellaswag", "piqa", "arc_challenge", "openbookqa"):
        assert got["acc_norm"] == np.mean(acc_norm)
    else:
        assert "acc_norm" not in got


def test_cli(evaluated, data_dir, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "eval.py"))["main"]
    output = tmp_path / "lambada.json"
    main(["--model", str(evaluated[2]), "--tasks", "lambada", "--limit", "1", "--output", str(output),
          "--data_dir", str(data_dir), "--batch_size", "4", "--no_progress"])
    assert set(json.loads(output.read_text())["results"]) == {"lambada"}
    assert re.search(r"lambada\s+perplexity\s+[\d.]+\s+\d+ tokens", capsys.readouterr().out)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "lambada,mmlu"], "unknown task(s) ['mmlu']"),
    (["--tasks", ","], "--tasks is empty"),
    (["--limit", "-1"], "--limit must be >= 1, got -1 (leave it out to score everything)"),
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--long_ppl_len", "0", "--tasks", "long_ppl"], "--long_ppl_len must be >= 1"),
    (["--long_ppl_len", "4096", "--plot", "x.png"], "--long_ppl_len, --plot only apply to long_ppl: add it to --tasks"),
])
def test_cli_rejects_bad_arguments_before_any_work(capsys, argv, message):
    main = runpy.run_path(str(REPO / "eval.py"))["main"]
    with pytest.raises(SystemExit):
        main(["--model", "/nonexistent/export", *argv])  # the export is never read
    assert message in capsys.readouterr().err


def test_run_rejects_a_limit_below_one(tmp_path):
    with pytest.raises(ValueError, match="limit must be >= 1"):
        run(tmp_path, ["lambada"], limit=-1)
