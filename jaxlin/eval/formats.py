"""Reading evaluation files: JSON lines and fields, with errors that name the file and line."""

from __future__ import annotations

import bz2
import json
from pathlib import Path
from typing import Iterator


class DataFormatError(ValueError):
    """A row of an evaluation file is malformed; the message starts with `file:line:`."""


def open_text(path: Path):
    return bz2.open(path, "rt", encoding="utf-8") if path.suffix == ".bz2" else open(path, encoding="utf-8")


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Yields (`file:line` for error messages, row object), skipping blank lines."""
    with open_text(path) as f:
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


def field(row: dict, key: str, kind: type | tuple[type, ...], where: str):
    if key not in row:
        raise DataFormatError(f"{where}: missing field '{key}' (the row has {sorted(row)})")
    value = row[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataFormatError(f"{where}: field '{key}' must be {names}, got {type(value).__name__} {value!r:.80}")
    return value


def strings(row: dict, key: str, count: int | None, where: str) -> list[str]:
    values = field(row, key, list, where)
    if not all(isinstance(v, str) for v in values) or (count is not None and len(values) != count):
        size = "a list of strings" if count is None else f"a list of {count} strings"
        raise DataFormatError(f"{where}: field '{key}' must be {size}, got {values!r:.120}")
    return values


def gold_index(value, n_choices: int, where: str, *, first: int = 0) -> int:
    """A gold label given as an int or a digit string, numbered from `first`; returns its 0-based index."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not first <= value < first + n_choices:
        raise DataFormatError(f"{where}: label must be an integer in [{first}, {first + n_choices - 1}], got {value!r}")
    return value - first
