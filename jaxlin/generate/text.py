"""Text in, text out: prompts encoded with the GPT-2 tokenizer, continuations decoded and cut at stop strings."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from jaxlin.generate.loop import Generator
from jaxlin.model import GPT

if TYPE_CHECKING:
    import tiktoken

STREAM_BLOCK = 8  # tokens per jitted block when streaming or watching for stop strings


def load_model(export_dir: str | os.PathLike, *, dtype: str | None = None) -> GPT:
    """The exported GPT (`jaxlin.export.load`); `dtype` overrides its compute dtype."""
    from jaxlin import export  # here, so that decoding alone needs no safetensors (the decode benchmark)
    return export.load(export_dir, dtype=dtype)[0]


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """As nanoGPT's sample.py: the text may name <|endoftext|>."""
    return tokenizer.encode(text, allowed_special={"<|endoftext|>"})


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return text[: min(ends)] if ends else text


def generate_text(model: GPT | Generator, tokenizer: tiktoken.Encoding, prompts: Sequence[str], *,
                  stop_strings: Sequence[str] = (), on_text: Callable[[list[str]], None] | None = None,
                  **kwargs) -> list[str]:
    """Continuations (text) of each prompt, `num_samples` per prompt, each cut at its first stop string;
    `kwargs` as `Generator.generate`. `on_text` gets each row's new text after every block, stop strings
    held back until they can no longer begin in it."""
    generator = model if isinstance(model, Generator) else Generator(model)
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: give some text to continue")
    stop_strings = [s for s in stop_strings if s]

    def reached_stop(row, tokens):
        text = tokenizer.decode(tokens)
        return cut_at_stop(text, stop_strings) != text

    stop = reached_stop if stop_strings else None
    on_tokens = None
    if on_text is not None:
        on_tokens = _TextStream(tokenizer, stop_strings, on_text)
    if stop is not None or on_tokens is not None:
        kwargs.setdefault("block", STREAM_BLOCK)
    outputs = generator.generate([encode(tokenizer, p) for p in prompts], stop=stop, on_tokens=on_tokens,
                                 **kwargs)
    texts = [cut_at_stop(tokenizer.decode(tokens), stop_strings) for tokens in outputs]
    if on_tokens is not None:
        on_tokens.flush(texts)
    return texts


class _TextStream:
    """Hands `on_text` each row's text as it grows: whole characters only (a token may end inside one) and
    none that may begin a stop string."""

    def __init__(self, tokenizer, stop_strings, on_text):
        self.tokenizer, self.stop_strings, self.on_text = tokenizer, stop_strings, on_text
        self.tokens, self.shown = None, None

    def __call__(self, new_tokens: list[list[int]]):
        if self.tokens is None:
            self.tokens, self.shown = [[] for _ in new_tokens], [0] * len(new_tokens)
        pieces = []
        for r, new in enumerate(new_tokens):
            self.tokens[r] += new
            # A token may end inside a character: hold back trailing replacement characters until it is whole.
            text = cut_at_stop(self.tokenizer.decode(self.tokens[r]).rstrip("\ufffd"), self.stop_strings)
            ready = len(text) - max((len(s) - 1 for s in self.stop_strings), default=0)
            pieces.append(self._take(r, text, ready))
        self.on_text(pieces)

    def flush(self, texts: list[str]):
        if self.tokens is not None:
            self.on_text([self._take(r, text, len(text)) for r, text in enumerate(texts)])

    def _take(self, r, text, end):
        piece = text[self.shown[r]:max(end, self.shown[r])]
        self.shown[r] += len(piece)
        return piece
