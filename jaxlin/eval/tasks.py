"""Evaluation tasks: the requests each task scores and its metrics (loaders of the multiple-choice
sets: jaxlin.eval.choice; long documents: jaxlin.eval.long_ppl).

Every task follows lm-evaluation-harness's zero-shot definition (prompt, target delimiter,
preprocessing, tokenisation of context/continuation pairs, metric), so its numbers compare with
`lm_eval --tasks <name>` run on the same weights. A request is a pair of token lists
(context, continuation); `jaxlin.eval.scoring.Scorer` returns their log-likelihoods.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tiktoken

from jaxlin.data.paths import require, resolve_data_dir
from jaxlin.data.tokenizer import EOT_TOKEN
from jaxlin.eval import long_ppl
from jaxlin.eval.choice import (Question, load_arc, load_boolq, load_copa, load_hellaswag, load_openbookqa,
                                load_piqa, load_winogrande)
from jaxlin.eval.formats import DataFormatError, field, jsonl_rows
from jaxlin.eval.metrics import accuracy
from jaxlin.eval.scoring import Scorer

Pair = tuple[list[int], list[int]]


# ----------------------------------------------------------------------------------------- wikitext


@dataclass(frozen=True)
class WikiText:
    text: str  # the whole file
    pages: tuple[str, ...]  # its articles, split as the harness's `wikitext_document_level` does


def load_wikitext(path: str | os.PathLike) -> WikiText:
    """Splits wiki.test.raw before every top-level `= Title =` heading (`= = Section = =` is not one)."""
    text = Path(path).read_text(encoding="utf-8")
    pages, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))  # the harness keeps the last page even when blank
    return WikiText(text, tuple(pages))


_WIKITEXT_PUNCTUATION = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                         (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "))
_WIKITEXT_TAIL = (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
                  (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"))


def detokenize_wikitext(page: str) -> str:
    """The harness's `wikitext_detokenizer`: undoes WikiText's spaced-out punctuation, in the same order."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)  # the harness's pattern, literal slashes included
    for old, new in _WIKITEXT_PUNCTUATION:
        s = s.replace(old, new)
    for left, right in ("()", "[]", "{}", '""', "''"):  # drop spaces just inside each pair
        pattern = f"{re.escape(left)}\\s*([^{re.escape(right)}]*?)\\s*{re.escape(right)}"
        s = re.sub(pattern, lambda m, l=left, r=right: l + m.group(1) + r, s)
    for old, new in _WIKITEXT_TAIL:
        s = s.replace(old, new)
    return s


# ----------------------------------------------------------------------------------------- lambada


def load_lambada(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(context, target) per passage: the text up to its last space, and " " + the last word."""
    docs = []
    for where, row in jsonl_rows(Path(path)):
        text = field(row, "text", str, where)
        if " " not in text:
            raise DataFormatError(f"{where}: field 'text' has no space to split off the last word: {text!r:.80}")
        context, word = text.rsplit(" ", 1)
        docs.append((context, " " + word))
    return docs


# ----------------------------------------------------------------------------------------- requests


def encode_pair(tokenizer: tiktoken.Encoding, context: str, continuation: str) -> Pair:
    """The harness's tokenisation of a request: trailing spaces of the context move to the
    continuation, and the continuation's tokens are those the whole string adds after the context's
    (so BPE merges across the boundary count for the continuation). An empty context becomes EOT."""
    if not context:
        return [EOT_TOKEN], tokenizer.encode_ordinary(continuation)
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    context_tokens = tokenizer.encode_ordinary(context)
    whole = tokenizer.encode_ordinary(context + continuation)
    return context_tokens, whole[len(context_tokens) :]


def rolling_windows(tokens: list[int], max_len: int) -> list[Pair]:
    """The harness's `loglikelihood_rolling` requests (context_len=1): the first window predicts the
    first `max_len` tokens after an EOT; each next one predicts the following `max_len` tokens from
    the one token before them; the last, shorter one is given as much preceding context as fits."""
    if not tokens:
        return []
    windows = [([EOT_TOKEN], tokens[:max_len])]
    for end in range(max_len, len(tokens), max_len):
        stop = min(end + max_len, len(tokens))
        windows.append((tokens[stop - max_len - 1 : end], tokens[end:stop]))
    return windows


def contiguous_windows(tokens: list[int], max_len: int) -> list[Pair]:
    """Non-overlapping windows of `max_len` inputs: every token but the first is predicted once,
    from the tokens before it in its window (nanoGPT-style validation loss)."""
    return [(tokens[start : start + 1], tokens[start + 1 : start + max_len + 1])
            for start in range(0, len(tokens) - 1, max_len)]


# ----------------------------------------------------------------------------------------- tasks


def _choice_metrics(scorer: Scorer, tokenizer, questions: list[Question], normalised: bool) -> dict:
    groups = [[encode_pair(tokenizer, c, x) for c, x in q.pairs] for q in questions]
    scores = scorer.choice_loglikelihoods(groups)
    gold = np.array([q.gold for q in questions])
    picked = np.array([np.argmax(s) for s in scores])  # ties go to the first choice, as np.argmax in the harness
    metrics = accuracy("acc", picked == gold)
    if normalised:  # the harness divides by len(choice) in characters (= bytes for ASCII text)
        picked = np.array([np.argmax(np.array(s) / [len(c) for c in q.choices]) for s, q in zip(scores, questions)])
        metrics |= accuracy("acc_norm", picked == gold)
    return metrics


def evaluate_wikitext2(scorer: Scorer, tokenizer, paths: list[Path], limit: int | None) -> dict:
    """token_perplexity: exp(mean NLL) of the raw file's tokens in contiguous windows (the number a
    training run's validation reports); word/byte perplexity and bits per byte: the harness's, from
    rolling windows over each detokenised page, per word and byte of the raw pages."""
    wiki = load_wikitext(paths[0])
    pages = wiki.pages[:limit]
    tokens = tokenizer.encode_ordinary(wiki.text if limit is None else "\n".join(pages))
    token_nll = -sum(ll for ll, _ in scorer.loglikelihood(contiguous_windows(tokens, scorer.max_len)))
    n_tokens = len(tokens) - 1  # every token but the first is predicted
    windows = [w for p in pages for w in rolling_windows(tokenizer.encode_ordinary(detokenize_wikitext(p)),
                                                         scorer.max_len)]
    total = sum(ll for ll, _ in scorer.loglikelihood(windows))
    words = sum(len(re.split(r"\s+", p)) for p in pages)  # the harness's count, edge blanks included
    n_bytes = sum(len(p.encode("utf-8")) for p in pages)
    return {
        "token_perplexity": math.exp(token_nll / n_tokens),
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / n_bytes),
        "bits_per_byte": -total / n_bytes / math.log(2),
        "tokens": n_tokens,
        "words": words,
        "bytes": n_bytes,
        "samples": len(pages),
    }


def evaluate_lambada(scorer: Scorer, tokenizer, paths: list[Path], limit: int | None) -> dict:
    """Perplexity exp(-mean log P(target word)) over passages, as the harness; `tokens`: target tokens."""
    docs = load_lambada(paths[0])[:limit]
    requests = [encode_pair(tokenizer, c, t) for c, t in docs]
    scores = scorer.loglikelihood(requests)
    return {
        "perplexity": math.exp(-np.mean([ll for ll, _ in scores])),
        **accuracy("acc", [greedy for _, greedy in scores]),
        "tokens": sum(len(continuation) for _, continuation in requests),
        "samples": len(docs),
    }


def _multiple_choice(loader: Callable[..., list[Question]], normalised: bool):
    def evaluate(scorer: Scorer, tokenizer, paths: list[Path], limit: int | None) -> dict:
        questions = loader(*paths)[:limit]
        return {**_choice_metrics(scorer, tokenizer, questions, normalised), "samples": len(questions)}

    return evaluate


@dataclass(frozen=True)
class Task:
    # evaluate(scorer, tokenizer, input paths, limit, **task options) -> metrics
    evaluate: Callable[..., dict]
    files: tuple[tuple[str, ...], ...]  # per input file, its accepted paths in the data dir (first found wins)


# In the column order of the linear-attention papers' zero-shot tables.
TASKS = {
    "wikitext2": Task(evaluate_wikitext2, (("wikitext-2-raw/wiki.test.raw",),)),
    "lambada": Task(evaluate_lambada, (("lambada/lambada_test.jsonl",),)),
    "piqa": Task(_multiple_choice(load_piqa, True), (("piqa/valid.jsonl",), ("piqa/valid-labels.lst",))),
    "hellaswag": Task(_multiple_choice(load_hellaswag, True),
                      (("hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_val_full.txt.bz2"),)),
    "winogrande": Task(_multiple_choice(load_winogrande, False),
                       (("winogrande/dev.jsonl", "winogrande/winogrande_dev_llmfoundry.jsonl"),)),
    "arc_easy": Task(_multiple_choice(load_arc, True), (("arc_easy/ARC-Easy-Test.jsonl",),)),
    "arc_challenge": Task(_multiple_choice(load_arc, True), (("arc_challenge/ARC-Challenge-Test.jsonl",),)),
    "boolq": Task(_multiple_choice(load_boolq, False), (("boolq/val.jsonl",),)),
    "copa": Task(_multiple_choice(load_copa, False), (("copa/val.jsonl",),)),
    "openbookqa": Task(_multiple_choice(load_openbookqa, True),
                       (("openbookqa/test.jsonl", "openbookqa/test.tsv"),)),
    # Perplexity by position over windows of long documents (a folder of .txt files).
    "long_ppl": Task(long_ppl.evaluate, ((long_ppl.DEFAULT_DIR,),)),
}
STANDARD_TASKS = tuple(name for name in TASKS if name != "long_ppl")  # the zero-shot table


def task_files(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The task's input files: for each, the first accepted path that exists, else a MissingDataError
    naming the last (the one the data download provides)."""
    root = resolve_data_dir(data_dir)
    return [next((root / p for p in options if (root / p).exists()), None) or require(root, options[-1])
            for options in TASKS[name].files]
