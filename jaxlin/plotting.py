"""What the plotting command lines share: their LABEL=PATH arguments."""

from __future__ import annotations

import argparse
from pathlib import Path


def labelled_files(parser: argparse.ArgumentParser, items: list[str], what: str) -> dict[str, Path]:
    """{label: path} of `items` in LABEL=PATH form, each PATH an existing file; otherwise the parser's
    error, which names `what` the file should be."""
    files = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"{item!r}: expected LABEL=PATH to an existing {what}")
        if label in files:
            parser.error(f"label {label!r} is given twice: give each curve a label of its own")
        files[label] = Path(path)
    return files
