"""Documents (strings) out of text files: .txt, .jsonl(.gz), .csv, .parquet, .zip of .txt files.

Text is decoded strictly in the given encoding (UTF-8 unless data.encoding / --encoding says otherwise): a
byte sequence that does not decode, or a NUL character (UTF-16 read as UTF-8 looks like that), stops with
the file and byte offset named. Parquet stores UTF-8 by definition, so its encoding is not a setting.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from jaxlin.errors import DataError

SUPPORTED_TEXT = (".txt", ".jsonl", ".jsonl.gz", ".csv", ".parquet", ".zip")
_FIX = "convert it to UTF-8 or set data.encoding (--encoding for jaxlin.data.prepare) to its encoding"


def is_supported(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SUPPORTED_TEXT)


def iter_documents(path: Path, text_field: str = "text", separator: str | None = None,
                   encoding: str = "utf-8") -> Iterator[str]:
    """Non-empty documents of `path` in file order. A .txt file is one document unless `separator`
    splits it; `text_field` names the jsonl field / csv or parquet column; a zip gives one document
    per .txt member (in name order, so READMEs and folders are skipped)."""
    name = path.name
    if name.endswith(".txt"):
        docs = _txt(path, separator, encoding)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        docs = _jsonl(path, text_field, encoding)
    elif name.endswith(".csv"):
        docs = _csv(path, text_field, encoding)
    elif name.endswith(".parquet"):
        docs = _parquet(path, text_field)
    elif name.endswith(".zip"):
        docs = _zip(path, encoding)
    else:
        raise ValueError(f"'{path}' has an unknown text format; supported: {SUPPORTED_TEXT}")
    return (doc for doc in docs if doc.strip())


def _strict(where: str, open_bytes: Callable[[], io.BufferedIOBase], encoding: str, read: Callable,
            newline: str | None = None):
    """Runs `read(text stream)`; a decoding error is reported with `where` and the byte offset, found by
    decoding the bytes again piece by piece (only then)."""
    try:
        with io.TextIOWrapper(open_bytes(), encoding=encoding, errors="strict", newline=newline) as f:
            yield from read(f)
    except UnicodeDecodeError as error:
        offset = _bad_byte(open_bytes, encoding)
        raise DataError(f"{where} is not valid {encoding} at byte {offset} ({error.reason}): {_FIX}") from None


def _bad_byte(open_bytes, encoding: str) -> int | None:
    decoder, done = codecs.getincrementaldecoder(encoding)("strict"), 0
    with open_bytes() as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                return done + error.start
            done += len(chunk)
    return done


def _no_nul(where: str, text: str, encoding: str) -> str:
    if "\0" in text:
        raise DataError(f"{where} holds a NUL character (character {text.index(chr(0))}): it is not {encoding} "
                        f"text (UTF-16?): {_FIX}")
    return text


def _txt(path: Path, separator: str | None, encoding: str) -> Iterator[str]:
    def read(f):
        text = _no_nul(f"'{path}'", f.read(), encoding)
        yield from text.split(separator) if separator else [text]
    yield from _strict(f"'{path}'", lambda: open(path, "rb"), encoding, read)


def _jsonl(path: Path, field: str, encoding: str) -> Iterator[str]:
    gz = path.name.endswith(".gz")
    where = f"'{path}' (decompressed)" if gz else f"'{path}'"

    def read(f):
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise DataError(f"'{path}' line {line_number} is not JSON ({error})") from None
            if not isinstance(record, dict) or field not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"'{path}' line {line_number} has no field '{field}' (fields: {fields}); "
                                "set text_field / --text_field")
            yield _no_nul(f"{where} line {line_number}", record[field], encoding)
    yield from _strict(where, lambda: gzip.open(path, "rb") if gz else open(path, "rb"), encoding, read)


def _csv(path: Path, column: str, encoding: str) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize)  # web documents exceed csv's 128 KB default

    def read(f):
        reader = csv.DictReader(f)
        _no_nul(f"'{path}' header", ",".join(reader.fieldnames or []), encoding)
        if column not in (reader.fieldnames or []):
            raise DataError(f"'{path}' has no column '{column}' (columns: {reader.fieldnames}); "
                            "set text_field / --text_field")
        for row in reader:
            yield _no_nul(f"'{path}' line {reader.line_num}", row[column], encoding)
    yield from _strict(f"'{path}'", lambda: open(path, "rb"), encoding, read, newline="")


def _parquet(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # optional: only parquet sources need it
    except ImportError as error:
        raise ImportError(f"reading '{path}' needs pyarrow: pip install pyarrow "
                          "(or pip install -e '.[parquet]')") from error
    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        raise DataError(f"'{path}' has no column '{column}' (columns: {parquet.schema_arrow.names}); "
                        "set text_field / --text_field")
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _zip(path: Path, encoding: str) -> Iterator[str]:
    with zipfile.ZipFile(path) as archive:
        for member in sorted(n for n in archive.namelist() if n.endswith(".txt")):
            where = f"'{path}' member '{member}'"
            yield from _strict(where, lambda: archive.open(member), encoding,
                               lambda f: [_no_nul(where, f.read(), encoding)])
