"""Text sources -> GPT-2 token shards (llm.c format), cached by a manifest.

Each document becomes `<|endoftext|>` + its tokens, as in llm.c's fineweb.py, so EOT marks where a
document starts. Every `round(1 / val_fraction)`-th document of each source is held out for validation;
a source with fewer documents than that (e.g. a single .txt file) gives its last `val_fraction` of tokens
instead, as nanoGPT splits tinyshakespeare.

    python -m jaxlin.data.prepare --data_dir /path/to/data --out runs/data/corpus \
        --sources train_corpus train_corpus_extra/*.jsonl.gz --val_fraction 0.01

The output folder may hold other files: a rebuild deletes only the shards its manifest lists as written
by jaxlin, and a folder holding .bin shards that no manifest lists (someone's own shards) is refused.
"""

from __future__ import annotations

import argparse
import codecs
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jaxlin.data import readers
from jaxlin.data.paths import require, resolve_data_dir, user_cache_dir
from jaxlin.data.shards import TOKEN_DTYPE, max_token_id, read_shard, write_shard
from jaxlin.errors import DataError, UserError
from jaxlin.data.tokenizer import EOT_TOKEN, get_tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_SOURCES = ("train_corpus", "train_corpus_extra")
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's shard size
_BATCH_CHARS = 8_000_000  # text handed to tiktoken's thread pool at once


class MissingSourceError(UserError, FileNotFoundError):
    """A source named in the settings matches no file."""


def resolve_sources(sources: Iterable[str], data_dir=None) -> tuple[list[Path], list[Path]]:
    """(text files, ready .bin shards) named by `sources`, each file once: paths relative to the data
    directory or absolute, globs, or folders (a folder holding .bin files is a shard folder, else its
    text files)."""
    root = resolve_data_dir(data_dir)
    texts, shards = [], []
    for source in sources:
        pattern = Path(source).expanduser()
        pattern = pattern if pattern.is_absolute() else root / pattern
        if any(c in str(source) for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(pattern)))
            if not matches:
                raise MissingSourceError(f"source pattern '{source}' matches no file (searched '{pattern}')")
        elif Path(source).is_absolute():
            if not pattern.exists():
                raise MissingSourceError(f"source '{pattern}' does not exist: fix data.sources / --sources")
            matches = [pattern]
        else:
            matches = [require(root, source)]
        for path in matches:
            if path.is_dir():
                bins = sorted(path.glob("*.bin"))
                found = bins or sorted(p for p in path.iterdir() if readers.is_supported(p))
                if not found:
                    raise MissingSourceError(
                        f"folder '{path}' holds no .bin shards and no text files ({readers.SUPPORTED_TEXT})"
                    )
                (shards if bins else texts).extend(found)
            elif path.suffix == ".bin":
                shards.append(path)
            elif readers.is_supported(path):
                texts.append(path)
            else:
                raise DataError(f"source '{path}' has an unknown format; supported: .bin, {readers.SUPPORTED_TEXT}")
    return _unique(texts), _unique(shards)


def _unique(paths: list[Path]) -> list[Path]:
    """First occurrences only, so overlapping globs or folders do not repeat a file."""
    return list(dict.fromkeys(p.resolve() for p in paths))


def split_ready_shards(shards: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(train, val) by name: llm.c writes `fineweb_train_000001.bin` / `fineweb_val_000000.bin`."""
    shards = list(shards)
    val = [p for p in shards if re.search(r"(^|_)val(_|$)", p.stem)]
    return [p for p in shards if p not in val], val


def prepare_corpus(
    sources: Iterable[str],
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.01,
    *,
    text_field: str = "text",
    separator: str | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_threads: int | None = None,
    encoding: str = "utf-8",
) -> tuple[list[Path], list[Path]]:
    """Tokenises the text sources into `out_dir` (reused when the manifest matches) and returns
    (train shard paths, val shard paths), ready .bin shards among the sources included as they are.

    Run it on one process of a multi-host job (then barrier): concurrent builds of one folder race.
    """
    sources = list(sources)
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1], got {val_fraction}")
    texts, ready = resolve_sources(sources, data_dir)
    train, val = split_ready_shards(ready)
    if texts:
        built_train, built_val = _build_cached(
            texts, Path(out_dir), data_dir, val_fraction, text_field, separator, shard_tokens,
            num_threads or os.cpu_count() or 1, encoding,
        )
        train, val = built_train + train, built_val + val
    if not train:
        raise DataError(f"sources {sources} gave no training shards: add text files or *_train_*.bin shards")
    return train, val


def check_token_ids(shards: Iterable[Path], vocab_size: int) -> None:
    """Raises DataError naming the first shard holding a token id the model has no embedding for. Each
    shard is scanned once; the result is remembered in the user cache."""
    cache = user_cache_dir().parent / "shard_max_token_ids.json"
    for path in shards:
        top = max_token_id(path, cache)
        if top >= vocab_size:
            raise DataError(
                f"shard '{path}' holds token id {top}, but model.vocab_size is {vocab_size}: it was tokenised "
                f"with another vocabulary. Rebuild it with GPT-2's tokenizer, or set model.vocab_size > {top}")


def _build_cached(texts, out_dir, data_dir, val_fraction, text_field, separator, shard_tokens, num_threads,
                  encoding="utf-8"):
    settings = {"val_fraction": val_fraction, "text_field": text_field, "separator": separator,
                "shard_tokens": shard_tokens, "eot_prefix": True}
    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):  # UTF-8 caches keep their key
        settings["encoding"] = encoding
    inputs = {
        "sources": [_file_identity(p) for p in texts],
        "tokenizer": _tokenizer_identity(data_dir),
        "settings": settings,
    }
    manifest_path = out_dir / MANIFEST
    # Runs started together on one corpus share this folder: one tokenises while the others wait, then reuse
    # it. The lock lives in the user cache, so the folder holds only what the manifest lists.
    folder_key = hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()
    lock_path = user_cache_dir().parent / "locks" / f"{folder_key}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _load_manifest(manifest_path)
        if cached is not None and cached.get("inputs") == inputs and _shards_intact(out_dir, cached):
            log.info("reusing %s (%d train + %d val tokens)", out_dir, cached["train_tokens"], cached["val_tokens"])
        else:
            cached = _build(texts, out_dir, data_dir, inputs, num_threads)
    return [out_dir / n for n in cached["train"]], [out_dir / n for n in cached["val"]]


def _owned_files(out_dir: Path) -> list[str]:
    """The files in `out_dir` that jaxlin wrote (its manifest lists them), after checking that no other
    shard or manifest is there: a folder of someone's own shards is never cleaned."""
    manifest_path = out_dir / MANIFEST
    manifest = _load_manifest(manifest_path)
    if manifest_path.exists() and manifest is None:
        raise DataError(f"'{manifest_path}' was not written by jaxlin (or by an incompatible version): "
                        "point data.shards_dir / --out at a new or empty folder")
    owned = (manifest or {}).get("owned", (manifest or {}).get("train", []) + (manifest or {}).get("val", []))
    foreign = sorted(p.name for p in out_dir.glob("*.bin") if p.name not in owned)
    if foreign:
        raise DataError(
            f"'{out_dir}' holds .bin shards jaxlin did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}), and tokenising would write beside them: to train on them, "
            "list the folder in data.sources / --sources; to tokenise text, point data.shards_dir / --out at "
            "a new or empty folder")
    return owned


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)


def _build(texts, out_dir, data_dir, inputs, num_threads) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    owned = _owned_files(out_dir)
    # An incomplete manifest lists every file as it is written, so an interrupted build is never taken as
    # done and its files are still known as jaxlin's.
    building = {"format": MANIFEST_FORMAT, "complete": False, "owned": owned}
    _write_manifest(out_dir, building)
    for name in owned:
        (out_dir / name).unlink(missing_ok=True)
        (out_dir / (name + ".partial")).unlink(missing_ok=True)
    building["owned"] = []

    def claim(name):
        building["owned"].append(name)
        _write_manifest(out_dir, building)

    settings = inputs["settings"]
    encoding = get_tokenizer(data_dir)
    val_every = round(1 / settings["val_fraction"]) if settings["val_fraction"] > 0 else 0
    train = _ShardWriter(out_dir, "train", settings["shard_tokens"], claim)
    val = _ShardWriter(out_dir, "val", settings["shard_tokens"], claim)
    for path in texts:
        start, before = time.perf_counter(), (train.total, val.total)
        docs = readers.iter_documents(path, settings["text_field"], settings["separator"],
                                      settings.get("encoding", "utf-8"))
        for is_val, tokens in _split(_tokenize(docs, encoding, num_threads), val_every):
            (val if is_val else train).add(tokens)
        log.info("%s: %d train + %d val tokens in %.1fs", path.name, train.total - before[0],
                 val.total - before[1], time.perf_counter() - start)
    manifest = {
        "format": MANIFEST_FORMAT, "inputs": inputs,
        "train": train.close(), "val": val.close(), "train_tokens": train.total, "val_tokens": val.total,
    }
    _write_manifest(out_dir, manifest)
    return manifest


def _tokenize(docs: Iterator[str], encoding, num_threads: int) -> Iterator[np.ndarray]:
    """EOT + tokens per document, tokenising batches of documents on tiktoken's thread pool."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS:
            yield from _encode(batch, encoding, num_threads)
            batch, chars = [], 0
    yield from _encode(batch, encoding, num_threads)


def _encode(batch, encoding, num_threads):
    for ids in encoding.encode_ordinary_batch(batch, num_threads=num_threads):
        tokens = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)
        tokens[0] = EOT_TOKEN
        tokens[1:] = ids
        yield tokens


def _split(documents: Iterator[np.ndarray], val_every: int) -> Iterator[tuple[bool, np.ndarray]]:
    """(is_val, tokens): every `val_every`-th document of one source is validation; a source with
    fewer documents gives its last 1/val_every of tokens (behind a fresh EOT) instead."""
    held = []  # the first val_every-1 documents wait until the source proves long enough
    for index, tokens in enumerate(documents):
        if val_every == 0:
            yield False, tokens
        elif index < val_every - 1:
            held.append(tokens)
        else:
            yield from ((False, t) for t in held)
            held = []
            yield index % val_every == val_every - 1, tokens
    if held:
        stream = np.concatenate(held)
        cut = len(stream) - max(1, round(len(stream) / val_every))
        yield False, stream[:cut]
        yield True, np.concatenate([np.array([EOT_TOKEN], TOKEN_DTYPE), stream[cut:]])


class _ShardWriter:
    """Streams tokens into `{prefix}_{index:06d}.bin` files of `shard_tokens` tokens each."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int, claim):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.claim = claim  # records a file name as jaxlin's before it is written
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.total = 0
        self.names: list[str] = []

    def add(self, tokens: np.ndarray):
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.total += len(tokens)
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[: self.shard_tokens])
            self.pending = [stream[self.shard_tokens:]]
            self.pending_tokens = len(self.pending[0])

    def close(self) -> list[str]:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        return self.names

    def _write(self, tokens):
        name = f"{self.prefix}_{len(self.names):06d}.bin"
        self.claim(name)
        write_shard(self.out_dir / name, tokens)
        self.names.append(name)


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _tokenizer_identity(data_dir) -> dict:
    digest = hashlib.sha256()
    for name in ("gpt2_tokenizer/vocab.bpe", "gpt2_tokenizer/encoder.json"):
        digest.update(require(data_dir, name).read_bytes())
    encoding = get_tokenizer(data_dir)
    return {"name": encoding.name, "n_vocab": encoding.n_vocab, "eot": EOT_TOKEN, "files_sha256": digest.hexdigest()}


def _load_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _shards_intact(out_dir: Path, manifest: dict) -> bool:
    try:
        counts = [len(read_shard(out_dir / n)) for n in manifest["train"] + manifest["val"]]
    except (OSError, ValueError):
        return False
    return sum(counts) == manifest["train_tokens"] + manifest["val_tokens"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="data directory (default: $JAXLIN_DATA_DIR, ../shared/data, cache)")
    parser.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES),
                        help="files, folders or globs, relative to the data directory or absolute")
    parser.add_argument("--val_fraction", type=float, default=0.01)
    parser.add_argument("--text_field", default="text", help="jsonl field / csv or parquet column")
    parser.add_argument("--separator", help=r"splits .txt files into documents, e.g. '\n\n' (escapes allowed)")
    parser.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--num_threads", type=int, help="tokeniser threads (default: all cores)")
    parser.add_argument("--encoding", default="utf-8", help="text encoding of the sources (decoded strictly)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    separator = codecs.decode(args.separator, "unicode_escape") if args.separator else None
    train, val = prepare_corpus(
        args.sources, args.out, args.data_dir, args.val_fraction, text_field=args.text_field,
        separator=separator, shard_tokens=args.shard_tokens, num_threads=args.num_threads, encoding=args.encoding,
    )
    print(json.dumps({"train": [str(p) for p in train], "val": [str(p) for p in val]}, indent=1))


if __name__ == "__main__":
    main()
