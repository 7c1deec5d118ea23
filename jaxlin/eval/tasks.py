"""Evaluation tasks: the data loaders and the requests each task scores.

Every task follows lm-evaluation-harness's zero-shot definition (prompt, target delimiter,
preprocessing, tokenisation of context/continuation pairs, metric), so its numbers compare with
`lm_eval --tasks <name>` run on the same weights. A request is a pair of token lists
(context, continuation); `jaxlin.eval.scoring.Scorer` returns their log-likelihoods.
"""

from __future__ import annotations

import bz2
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import tiktoken

from jaxlin.data.paths import require, resolve_data_dir
from jaxlin.data.tokenizer import EOT_TOKEN
from jaxlin.eval.scoring import Scorer

Pair = tuple[list[int], list[int]]


class DataFormatError(ValueError):
    """A row of an evaluation file is malformed; the message starts with `file:line:`."""


# ----------------------------------------------------------------------------------------- reading


def _open_text(path: Path):
    return bz2.open(path, "rt", encoding="utf-8") if path.suffix == ".bz2" else open(path, encoding="utf-8")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Yields (`file:line` for error messages, row object), skipping blank lines."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _field(row: dict, key: str, kind: type | tuple[type, ...], where: str):
    if key not in row:
        raise DataFormatError(f"{where}: missing field '{key}' (the row has {sorted(row)})")
    value = row[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataFormatError(f"{where}: field '{key}' must be {names}, got {type(value).__name__} {value!r:.80}")
    return value


def _strings(row: dict, key: str, count: int | None, where: str) -> list[str]:
    values = _field(row, key, list, where)
    if not all(isinstance(v, str) for v in values) or (count is not None and len(values) != count):
        size = "a list of strings" if count is None else f"a list of {count} strings"
        raise DataFormatError(f"{where}: field '{key}' must be {size}, got {values!r:.120}")
    return values


def _label(value, n_choices: int, where: str, *, first: int = 0) -> int:
    """A gold label given as an int or a digit string, numbered from `first`; returns its 0-based index."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not first <= value < first + n_choices:
        raise DataFormatError(f"{where}: label must be an integer in [{first}, {first + n_choices - 1}], got {value!r}")
    return value - first


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
    for where, row in _jsonl_rows(Path(path)):
        text = _field(row, "text", str, where)
        if " " not in text:
            raise DataFormatError(f"{where}: field 'text' has no space to split off the last word: {text!r:.80}")
        context, word = text.rsplit(" ", 1)
        docs.append((context, " " + word))
    return docs


# ----------------------------------------------------------------------------------------- multiple choice


@dataclass(frozen=True)
class Question:
    """One multiple-choice item. Choice i is scored as log P(pairs[i][1] | pairs[i][0])."""

    pairs: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int
    choices: tuple[str, ...]  # the choice texts; acc_norm divides by their length


def _continuations(context: str, choices: list[str], gold: int) -> Question:
    """The common shape: one context, the harness's target delimiter " " before each choice."""
    return Question(tuple((context, " " + c) for c in choices), gold, tuple(choices))


def load_arc(path: str | os.PathLike) -> list[Question]:
    """AI2 ARC jsonl rows: question.stem, question.choices [{text, label}], answerKey."""
    questions = []
    for where, row in _jsonl_rows(Path(path)):
        question = _field(row, "question", dict, where)
        stem = _field(question, "stem", str, where)
        choices = _field(question, "choices", list, where)
        if not choices or not all(isinstance(c, dict) for c in choices):
            raise DataFormatError(f"{where}: question.choices must be a non-empty list of {{text, label}} objects")
        texts = [_field(c, "text", str, where) for c in choices]
        labels = [_field(c, "label", str, where) for c in choices]
        key = _field(row, "answerKey", str, where)
        if key not in labels:
            raise DataFormatError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
        questions.append(_continuations(f"Question: {stem}\nAnswer:", texts, labels.index(key)))
    return questions


def _hellaswag_preprocess(text: str) -> str:
    """The harness's cleaning of WikiHow artefacts: `[title]` ends a sentence, other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


# In the 6-line text format the query is `activity_label: ctx_a ctx_b` with ctx_b still lower-case.
# The harness capitalises ctx_b: for ActivityNet rows it is the trailing fragment after the last
# sentence end that starts lower-case (WikiHow rows have an empty ctx_b and end on a full stop).
_CTX_B = re.compile(r"(?<=[.!?] )[a-z][^.!?]*$")


def load_hellaswag(path: str | os.PathLike) -> list[Question]:
    """HellaSwag validation, from the 6-line text format (`.txt`, `.txt.bz2`) or the original `.jsonl`."""
    path = Path(path)
    if path.name.endswith(".jsonl"):
        return [_hellaswag_jsonl_row(row, where) for where, row in _jsonl_rows(path)]
    if not path.name.endswith((".txt", ".txt.bz2")):
        raise DataFormatError(f"{path}: unknown HellaSwag format; expected .jsonl, .txt or .txt.bz2")
    with _open_text(path) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        start = len(lines) - len(lines) % 6 + 1
        raise DataFormatError(f"{path}:{start}: incomplete item: each item is 6 lines (query, label, 4 endings), "
                              f"the file ends after {len(lines) % 6}")
    questions = []
    for start in range(0, len(lines), 6):
        query, label, *endings = lines[start : start + 6]
        gold = _label(label, 4, f"{path}:{start + 2}")
        query = _CTX_B.sub(lambda m: m.group(0).capitalize(), _hellaswag_preprocess(query))
        questions.append(_continuations(query, [_hellaswag_preprocess(e) for e in endings], gold))
    return questions


def _hellaswag_jsonl_row(row: dict, where: str) -> Question:
    ctx = _field(row, "ctx_a", str, where) + " " + _field(row, "ctx_b", str, where).capitalize()
    query = _hellaswag_preprocess(_field(row, "activity_label", str, where) + ": " + ctx)
    endings = [_hellaswag_preprocess(e) for e in _strings(row, "endings", 4, where)]
    return _continuations(query, endings, _label(_field(row, "label", (int, str), where), 4, where))


def load_piqa(path: str | os.PathLike, labels_path: str | os.PathLike) -> list[Question]:
    """PIQA rows {goal, sol1, sol2} with gold 0/1 one per line in the labels file."""
    labels_path = Path(labels_path)
    labels = labels_path.read_text(encoding="utf-8").split()
    rows = list(_jsonl_rows(Path(path)))
    if len(labels) != len(rows):
        raise DataFormatError(f"{labels_path}: {len(labels)} labels for {len(rows)} rows of {path}")
    questions = []
    for lineno, ((where, row), label) in enumerate(zip(rows, labels), 1):
        solutions = [_field(row, "sol1", str, where), _field(row, "sol2", str, where)]
        gold = _label(label, 2, f"{labels_path}:{lineno}")
        questions.append(_continuations(f"Question: {_field(row, 'goal', str, where)}\nAnswer:", solutions, gold))
    return questions


def load_winogrande(path: str | os.PathLike) -> list[Question]:
    """WinoGrande, partial scoring: the sentence up to the blank, filled with each option, is the
    context; the rest of the sentence is the one continuation both contexts share.

    Rows are either llm-foundry's {context_options, continuation, gold} or the original
    {sentence (with one `_`), option1, option2, answer "1"/"2"}.
    """
    questions = []
    for where, row in _jsonl_rows(Path(path)):
        if "context_options" in row:
            contexts = _strings(row, "context_options", 2, where)
            rest = _field(row, "continuation", str, where).strip()
            gold = _label(_field(row, "gold", (int, str), where), 2, where)
        elif "sentence" in row:
            sentence = _field(row, "sentence", str, where)
            if sentence.count("_") != 1:
                raise DataFormatError(f"{where}: 'sentence' must contain exactly one '_' blank: {sentence!r:.80}")
            blank = sentence.index("_")
            options = [_field(row, "option1", str, where), _field(row, "option2", str, where)]
            contexts = [sentence[:blank] + option for option in options]
            rest = sentence[blank + 1 :].strip()
            gold = _label(_field(row, "answer", (int, str), where), 2, where, first=1)
        else:
            raise DataFormatError(f"{where}: expected fields context_options/continuation/gold or "
                                  f"sentence/option1/option2/answer, got {sorted(row)}")
        questions.append(Question(tuple((c, " " + rest) for c in contexts), gold, tuple(contexts)))
    return questions


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
    metrics = {"acc": float(np.mean(picked == gold))}
    if normalised:  # the harness divides by len(choice) in characters (= bytes for ASCII text)
        picked = np.array([np.argmax(np.array(s) / [len(c) for c in q.choices]) for s, q in zip(scores, questions)])
        metrics["acc_norm"] = float(np.mean(picked == gold))
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
        "samples": len(pages),
    }


def evaluate_lambada(scorer: Scorer, tokenizer, paths: list[Path], limit: int | None) -> dict:
    docs = load_lambada(paths[0])[:limit]
    scores = scorer.loglikelihood([encode_pair(tokenizer, c, t) for c, t in docs])
    return {
        "perplexity": math.exp(-np.mean([ll for ll, _ in scores])),
        "acc": float(np.mean([greedy for _, greedy in scores])),
        "samples": len(docs),
    }


def _multiple_choice(loader: Callable[..., list[Question]], normalised: bool):
    def evaluate(scorer: Scorer, tokenizer, paths: list[Path], limit: int | None) -> dict:
        questions = loader(*paths)[:limit]
        return {**_choice_metrics(scorer, tokenizer, questions, normalised), "samples": len(questions)}

    return evaluate


@dataclass(frozen=True)
class Task:
    evaluate: Callable[[Scorer, tiktoken.Encoding, list[Path], int | None], dict]
    files: tuple[tuple[str, ...], ...]  # per input file, its accepted paths in the data dir (first found wins)


TASKS = {
    "wikitext2": Task(evaluate_wikitext2, (("wikitext-2-raw/wiki.test.raw",),)),
    "lambada": Task(evaluate_lambada, (("lambada/lambada_test.jsonl",),)),
    "arc_easy": Task(_multiple_choice(load_arc, True), (("arc_easy/ARC-Easy-Test.jsonl",),)),
    "hellaswag": Task(_multiple_choice(load_hellaswag, True),
                      (("hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_val_full.txt.bz2"),)),
    "piqa": Task(_multiple_choice(load_piqa, True), (("piqa/valid.jsonl",), ("piqa/valid-labels.lst",))),
    "winogrande": Task(_multiple_choice(load_winogrande, False),
                       (("winogrande/dev.jsonl", "winogrande/winogrande_dev_llmfoundry.jsonl"),)),
}


def task_files(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The task's input files: for each, the first accepted path that exists, else a MissingDataError
    naming the last (the one the data download provides)."""
    root = resolve_data_dir(data_dir)
    return [next((root / p for p in options if (root / p).exists()), None) or require(root, options[-1])
            for options in TASKS[name].files]
