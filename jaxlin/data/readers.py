"""Documents (strings) out of text files: .txt, .jsonl(.gz), .csv, .parquet, .zip of .txt files."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

SUPPORTED_TEXT = (".txt", ".jsonl", ".jsonl.gz", ".csv", ".parquet", ".zip")


def is_supported(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SUPPORTED_TEXT)


def iter_documents(path: Path, text_field: str = "text", separator: str | None = None) -> Iterator[str]:
    """Non-empty documents of `path` in file order. A .txt file is one document unless `separator`
    splits it; `text_field` names the jsonl field / csv or parquet column; a zip gives one document
    per .txt member (in name order, so READMEs and folders are skipped). Plain text that is not valid
    UTF-8 gets U+FFFD for the bad bytes; jsonl and csv must be UTF-8."""
    name = path.name
    if name.endswith(".txt"):
        docs = _txt(path, separator)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        docs = _jsonl(path, text_field)
    elif name.endswith(".csv"):
        docs = _csv(path, text_field)
    elif name.endswith(".parquet"):
        docs = _parquet(path, text_field)
    elif name.endswith(".zip"):
        docs = _zip(path)
    else:
        raise ValueError(f"'{path}' has an unknown text format; supported: {SUPPORTED_TEXT}")
    return (doc for doc in docs if doc.strip())


def _txt(path: Path, separator: str | None) -> Iterator[str]:
    text = path.read_text(encoding="utf-8", errors="replace")  # plain text declares no encoding
    yield from text.split(separator) if separator else [text]


def _jsonl(path: Path, field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise ValueError(f"'{path}' line {line_number} has no field '{field}' (fields: {sorted(record)}); "
                                 "set text_field / --text_field")
            yield record[field]


def _csv(path: Path, column: str) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize)  # web documents exceed csv's 128 KB default
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"'{path}' has no column '{column}' (columns: {reader.fieldnames}); "
                             "set text_field / --text_field")
        for row in reader:
            yield row[column]


def _parquet(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # optional: only parquet sources need it
    except ImportError as error:
        raise ImportError(f"reading '{path}' needs pyarrow: pip install pyarrow "
                          "(or pip install -e '.[parquet]')") from error
    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        raise ValueError(f"'{path}' has no column '{column}' (columns: {parquet.schema_arrow.names}); "
                         "set text_field / --text_field")
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _zip(path: Path) -> Iterator[str]:
    with zipfile.ZipFile(path) as archive:
        for member in sorted(n for n in archive.namelist() if n.endswith(".txt")):
            with archive.open(member) as f:
                yield io.TextIOWrapper(f, encoding="utf-8", errors="replace").read()
