"""Token shards in llm.c's format, so FineWeb shards made by llm.c's `fineweb.py` load as is.

Layout: a header of 256 little-endian int32 (magic 20240520, version 1, token count, rest zero),
then the tokens as little-endian uint16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxlin.errors import DataError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
_LLAMA3_MAGIC = 20240801  # llm.c's uint32 variant: named in the error, not supported


def write_shard(path: str | os.PathLike, tokens) -> Path:
    """Writes `tokens` (ids < 2**16) as one shard; the file appears only once complete."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens for shard '{path}' must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"tokens for shard '{path}' must lie in [0, 65535] to fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
    os.replace(partial, path)  # readers never see a half-written shard
    return path


def read_shard(path: str | os.PathLike) -> np.memmap:
    """The shard's tokens as a read-only uint16 memmap (an empty array for an empty shard);
    a ValueError names the file and the fault."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"shard '{path}' is {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(x) for x in header[:3])
    if magic != MAGIC:
        hint = " (llm.c's Llama-3 uint32 format)" if magic == _LLAMA3_MAGIC else ""
        raise DataError(f"shard '{path}' has magic {magic}{hint}; expected {MAGIC} (llm.c GPT-2 uint16 shard)")
    if version != VERSION:
        raise DataError(f"shard '{path}' has version {version}; expected {VERSION}")
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        raise DataError(
            f"shard '{path}' is {size} bytes but its header counts {count} tokens ({expected} bytes): "
            "truncated or corrupt; rebuild it"
        )
    if count == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))



def max_token_id(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> int:
    """The largest token id in a shard (-1 when empty). A scan of the file, remembered in `cache` (a JSON
    file keyed by path, size and modification time), so each shard is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    known = _read_cache(cache)
    if key not in known:
        tokens = read_shard(path)
        step = 1 << 26  # 128 MiB at a time
        known[key] = max((int(tokens[i:i + step].max()) for i in range(0, len(tokens), step)), default=-1)
        if cache is not None:
            _write_cache(Path(cache), known)
    return known[key]


def _read_cache(cache) -> dict:
    try:
        return json.loads(Path(cache).read_text()) if cache is not None else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: Path, known: dict) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(known))
    os.replace(partial, cache)
