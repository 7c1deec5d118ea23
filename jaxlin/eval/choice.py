"""Multiple-choice tasks: each loader turns an official file into Questions with lm-evaluation-harness's
prompts (context, target delimiter " " + choice) and gold index."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from jaxlin.eval.formats import DataFormatError, field, gold_index, jsonl_rows, open_text, strings


@dataclass(frozen=True)
class Question:
    """One multiple-choice item. Choice i is scored as log P(pairs[i][1] | pairs[i][0])."""

    pairs: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int
    choices: tuple[str, ...]  # the choice texts; acc_norm divides by their length


def _continuations(context: str, choices: list[str], gold: int) -> Question:
    """The common shape: one context, the harness's target delimiter " " before each choice."""
    return Question(tuple((context, " " + c) for c in choices), gold, tuple(choices))


def _arc_rows(path: Path, prompt) -> list[Question]:
    """AI2's jsonl format (ARC, OpenBookQA): question.stem, question.choices [{text, label}], answerKey;
    `prompt(stem)` is the context."""
    questions = []
    for where, row in jsonl_rows(path):
        question = field(row, "question", dict, where)
        stem = field(question, "stem", str, where)
        choices = field(question, "choices", list, where)
        if not choices or not all(isinstance(c, dict) for c in choices):
            raise DataFormatError(f"{where}: question.choices must be a non-empty list of {{text, label}} objects")
        texts = [field(c, "text", str, where) for c in choices]
        labels = [field(c, "label", str, where) for c in choices]
        key = field(row, "answerKey", str, where).strip()
        if key not in labels:
            raise DataFormatError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
        questions.append(_continuations(prompt(stem), texts, labels.index(key)))
    return questions


def load_arc(path: str | os.PathLike) -> list[Question]:
    """ARC-Easy / ARC-Challenge: "Question: <stem>\nAnswer:"."""
    return _arc_rows(Path(path), lambda stem: f"Question: {stem}\nAnswer:")


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
        return [_hellaswag_jsonl_row(row, where) for where, row in jsonl_rows(path)]
    if not path.name.endswith((".txt", ".txt.bz2")):
        raise DataFormatError(f"{path}: unknown HellaSwag format; expected .jsonl, .txt or .txt.bz2")
    with open_text(path) as f:
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
        gold = gold_index(label, 4, f"{path}:{start + 2}")
        query = _CTX_B.sub(lambda m: m.group(0).capitalize(), _hellaswag_preprocess(query))
        questions.append(_continuations(query, [_hellaswag_preprocess(e) for e in endings], gold))
    return questions


def _hellaswag_jsonl_row(row: dict, where: str) -> Question:
    ctx = field(row, "ctx_a", str, where) + " " + field(row, "ctx_b", str, where).capitalize()
    query = _hellaswag_preprocess(field(row, "activity_label", str, where) + ": " + ctx)
    endings = [_hellaswag_preprocess(e) for e in strings(row, "endings", 4, where)]
    return _continuations(query, endings, gold_index(field(row, "label", (int, str), where), 4, where))


def load_piqa(path: str | os.PathLike, labels_path: str | os.PathLike) -> list[Question]:
    """PIQA rows {goal, sol1, sol2} with gold 0/1 one per line in the labels file."""
    labels_path = Path(labels_path)
    labels = labels_path.read_text(encoding="utf-8").split()
    rows = list(jsonl_rows(Path(path)))
    if len(labels) != len(rows):
        raise DataFormatError(f"{labels_path}: {len(labels)} labels for {len(rows)} rows of {path}")
    questions = []
    for lineno, ((where, row), label) in enumerate(zip(rows, labels), 1):
        solutions = [field(row, "sol1", str, where), field(row, "sol2", str, where)]
        gold = gold_index(label, 2, f"{labels_path}:{lineno}")
        questions.append(_continuations(f"Question: {field(row, 'goal', str, where)}\nAnswer:", solutions, gold))
    return questions


def load_winogrande(path: str | os.PathLike) -> list[Question]:
    """WinoGrande, partial scoring: the sentence up to the blank, filled with each option, is the
    context; the rest of the sentence is the one continuation both contexts share.

    Rows are either llm-foundry's {context_options, continuation, gold} or the original
    {sentence (with one `_`), option1, option2, answer "1"/"2"}.
    """
    questions = []
    for where, row in jsonl_rows(Path(path)):
        if "context_options" in row:
            contexts = strings(row, "context_options", 2, where)
            rest = field(row, "continuation", str, where).strip()
            gold = gold_index(field(row, "gold", (int, str), where), 2, where)
        elif "sentence" in row:
            sentence = field(row, "sentence", str, where)
            if sentence.count("_") != 1:
                raise DataFormatError(f"{where}: 'sentence' must contain exactly one '_' blank: {sentence!r:.80}")
            blank = sentence.index("_")
            options = [field(row, "option1", str, where), field(row, "option2", str, where)]
            contexts = [sentence[:blank] + option for option in options]
            rest = sentence[blank + 1 :].strip()
            gold = gold_index(field(row, "answer", (int, str), where), 2, where, first=1)
        else:
            raise DataFormatError(f"{where}: expected fields context_options/continuation/gold or "
                                  f"sentence/option1/option2/answer, got {sorted(row)}")
        questions.append(Question(tuple((c, " " + rest) for c in contexts), gold, tuple(contexts)))
    return questions


def load_boolq(path: str | os.PathLike) -> list[Question]:
    """SuperGLUE BoolQ rows {question (no "?"), passage, label "true"/"false" or a bool or 0/1}."""
    questions = []
    for where, row in jsonl_rows(Path(path)):
        answer = field(row, "label", (str, bool, int), where)
        if isinstance(answer, str):
            if answer.lower() not in ("true", "false"):
                raise DataFormatError(f"{where}: label must be true or false, got {answer!r}")
            answer = answer.lower() == "true"
        gold = gold_index(int(answer), 2, where)
        context = f"{field(row, 'passage', str, where)}\nQuestion: {field(row, 'question', str, where)}?\nAnswer:"
        questions.append(_continuations(context, ["no", "yes"], gold))
    return questions


_COPA_CONNECTORS = {"cause": "because", "effect": "therefore"}


def load_copa(path: str | os.PathLike) -> list[Question]:
    """SuperGLUE COPA rows {premise, choice1, choice2, question cause/effect, label 0/1}. The premise
    loses its full stop and gains the connector; each choice, lower-cased at its first letter, already
    starts with a space, to which the target delimiter adds another."""
    questions = []
    for where, row in jsonl_rows(Path(path)):
        relation = field(row, "question", str, where)
        if relation not in _COPA_CONNECTORS:
            raise DataFormatError(f"{where}: field 'question' must be 'cause' or 'effect', got {relation!r}")
        context = field(row, "premise", str, where).strip()[:-1] + " " + _COPA_CONNECTORS[relation]
        choices = [" " + c[:1].lower() + c[1:] for c in (field(row, "choice1", str, where),
                                                          field(row, "choice2", str, where))]
        questions.append(_continuations(context, choices, gold_index(field(row, "label", (int, str), where), 2, where)))
    return questions


_OPENBOOKQA_CHOICE = re.compile(r"\(([A-Z])\) ")


def load_openbookqa(path: str | os.PathLike) -> list[Question]:
    """OpenBookQA, the question stem alone as the prompt. From the official `.tsv` (ID, Question Stem,
    Choices as `(A) text (B) text ...`, Complete Question, Answer Key) or `.jsonl` (ARC's format)."""
    path = Path(path)
    if path.name.endswith(".jsonl"):
        return _arc_rows(path, lambda stem: stem)
    with open_text(path) as f:
        header, *lines = f.read().split("\n")
    columns = header.split("\t")
    missing = {"Question Stem", "Choices", "Answer Key"} - set(columns)
    if missing:
        raise DataFormatError(f"{path}:1: missing column(s) {sorted(missing)} (the header has {columns})")
    stem_at, choices_at, key_at = (columns.index(c) for c in ("Question Stem", "Choices", "Answer Key"))
    questions = []
    for lineno, line in enumerate(lines, 2):
        if not line.strip():
            continue
        where, cells = f"{path}:{lineno}", line.split("\t")
        if len(cells) != len(columns):
            raise DataFormatError(f"{where}: {len(cells)} tab-separated cells, the header has {len(columns)}")
        parts = _OPENBOOKQA_CHOICE.split(cells[choices_at])  # ["", "A", text, "B", text, ...]
        labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
        key = cells[key_at].strip()
        if parts[0].strip() or not labels or key not in labels:
            raise DataFormatError(f"{where}: expected choices as '(A) text (B) text ...' including the answer key "
                                  f"{key!r}, got {cells[choices_at]!r:.120}")
        questions.append(_continuations(cells[stem_at], texts, labels.index(key)))
    return questions
