"""GPT-2 BPE through tiktoken, loaded offline from the data directory."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from jaxlin.data.paths import require, resolve_data_dir

if TYPE_CHECKING:
    import tiktoken

EOT_TOKEN = 50256  # <|endoftext|>, the document separator
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_base / gpt2).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.lru_cache(maxsize=4)
def _load(root: str) -> tiktoken.Encoding:
    import tiktoken  # here, so that EOT_TOKEN needs no tiktoken (the decode benchmark's machine)
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab = require(root, "gpt2_tokenizer/vocab.bpe")
    encoder = require(root, "gpt2_tokenizer/encoder.json")
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab), str(encoder))
    return tiktoken.Encoding(
        name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


def get_tokenizer(data_dir: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding built from the data directory's BPE files (no network)."""
    return _load(str(resolve_data_dir(data_dir)))
