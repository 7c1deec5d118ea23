"""End to end: every task on a few documents, checked against a plain recomputation of its definition
(one forward per request, no batching, bucketing or state reuse)."""

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
    results, written, _ = evaluated
    assert written == results
    assert list(results) == ["wikitext2", "lambada", "arc_easy", "hellaswag", "piqa", "winogrande"]
    assert all(r["samples"] == LIMIT for r in results.values())
    assert set(results["hellaswag"]) == {"acc", "acc_norm", "samples"}
    assert set(results["winogrande"]) == {"acc", "samples"}


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


@pytest.mark.parametrize("task", ["arc_easy", "hellaswag", "piqa", "winogrande"])
def test_multiple_choice(evaluated, data_dir, model, task):
    tok = get_tokenizer(data_dir)
    loader = {"arc_easy": tasks.load_arc, "hellaswag": tasks.load_hellaswag, "piqa": tasks.load_piqa,
              "winogrande": tasks.load_winogrande}[task]
    questions = loader(*tasks.task_files(task, data_dir))[:LIMIT]  # prompts: see test_tasks.py
    acc, acc_norm = [], []
    for q in questions:
        lls = np.array([reference_loglikelihood(model, *harness_encode(tok, c, x))[0] for c, x in q.pairs])
        acc.append(np.argmax(lls) == q.gold)
        acc_norm.append(np.argmax(lls / [len(c) for c in q.choices]) == q.gold)
    got = evaluated[0][task]
    assert got["acc"] == np.mean(acc)
    if task != "winogrande":
        assert got["acc_norm"] == np.mean(acc_norm)


def test_cli(evaluated, data_dir, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "eval.py"))["main"]
    output = tmp_path / "lambada.json"
    main(["--model", str(evaluated[2]), "--tasks", "lambada", "--limit", "1", "--output", str(output),
          "--data_dir", str(data_dir), "--batch_size", "4", "--no_progress"])
    assert set(json.loads(output.read_text())) == {"lambada"}
    assert re.search(r"lambada\s+perplexity\s+[\d.]+\s+1", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["--model", str(evaluated[2]), "--tasks", "lambada,mmlu"])
    assert "unknown task(s) ['mmlu']" in capsys.readouterr().err
