"""Perplexity by position on long documents (length extrapolation), in the manner of PG-19 evaluations.

Each document (a .txt file of a folder) is tokenised and cut into consecutive windows of L input tokens
(the last, shorter piece is dropped, so every position has the same number of windows); each window runs
in one forward pass from an empty state and predicts its next L tokens. The loss is averaged per
position and reported per position bucket (0-1k, 1k-2k, 2k-4k, 4k-8k, ...), plus a curve for plots.

Recurrent layers run any length in one pass (the linear-attention ops carry their state across their
chunks). A model with learned positions has none past its block size: its windows are block_size long,
which the results state.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

DEFAULT_DIR = "long_books"  # in the data directory
DEFAULT_WINDOW = 16384
FIRST_BUCKET = 1024
CURVE_POINTS = 128  # at most this many points on the loss-by-position curve
_LOGIT_SLICE = 1024  # positions whose logits exist at once ([rows, slice, vocab] float32)


def list_documents(folder: str | os.PathLike) -> list[Path]:
    """The folder's .txt files, sorted; a ValueError naming the folder when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"long documents folder '{folder}' does not exist; give --long_docs DIR "
                         f"(a folder of .txt files) or fetch long_books with python -m jaxlin.data.download")
    paths = sorted(folder.glob("*.txt"))
    if not paths:
        raise ValueError(f"no .txt files in '{folder}': long_ppl scores each .txt file of the folder")
    return paths


def cut_windows(tokens, length: int) -> np.ndarray:
    """[n, length + 1] consecutive windows: window i reads tokens[i*length : (i+1)*length] and predicts
    the token after each; the tail too short for a whole window is dropped."""
    tokens = np.asarray(tokens, np.int32)
    n = max(0, (len(tokens) - 1) // length)
    return np.stack([tokens[i * length : (i + 1) * length + 1] for i in range(n)]) if n else \
        np.zeros((0, length + 1), np.int32)


def position_buckets(length: int, first: int = FIRST_BUCKET) -> list[tuple[int, int]]:
    """[0, first), [first, 2 first), [2 first, 4 first), ... with the last one ending at `length`."""
    edges = [0, min(first, length)]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    return list(zip(edges[:-1], edges[1:]))


def bucket_name(start: int, end: int) -> str:
    short = lambda n: f"{n // 1024}k" if n and n % 1024 == 0 else str(n)
    return f"{short(start)}-{short(end)}"


def summarize(nll_sum: np.ndarray, n_windows: int, first: int = FIRST_BUCKET) -> dict:
    """Loss per bucket and the averaged curve from the per-position NLL summed over `n_windows` windows."""
    length = len(nll_sum)
    per_position = nll_sum / n_windows
    buckets = []
    for start, end in position_buckets(length, first):
        loss = float(per_position[start:end].mean())
        buckets.append({"positions": bucket_name(start, end), "start": start, "end": end, "loss": loss,
                        "perplexity": math.exp(loss), "tokens": n_windows * (end - start)})
    # The curve: mean loss over log-spaced ranges of positions (fine near the start, smooth further on).
    ends = np.unique(np.round(np.geomspace(1, length, CURVE_POINTS)).astype(int))
    starts = np.concatenate([[0], ends[:-1]])
    loss = float(per_position.mean())
    return {"loss": loss, "perplexity": math.exp(loss), "buckets": buckets,
            "curve": {"start": starts.tolist(), "end": ends.tolist(),
                      "loss": [round(float(per_position[a:b].mean()), 5) for a, b in zip(starts, ends)]}}


def window_length(config, requested: int) -> tuple[int, str | None]:
    """The window a model can read in one pass, and a note when it is shorter than asked."""
    if config.uses_pos_embedding and requested > config.block_size:
        return config.block_size, (f"learned positions end at block_size={config.block_size}: windows of "
                                   f"{config.block_size} tokens, not {requested}")
    return requested, None


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef, params, windows):
    """-log P(next token) at every position of `windows` [rows, L + 1] -> [rows, L] float32; the logits
    exist one slice of positions at a time."""
    model = nnx.merge(graphdef, params)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    rows, length = inputs.shape
    hidden = model.hidden(inputs)
    size = min(length, _LOGIT_SLICE)
    pad = -length % size
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    slices = lambda x: jnp.moveaxis(x.reshape(rows, -1, size, *x.shape[2:]), 1, 0)

    def nll(slice_):
        h, t = slice_
        logits = model.logits(h)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]

    out = jax.lax.map(nll, (slices(hidden), slices(targets)))
    return jnp.moveaxis(out, 0, 1).reshape(rows, -1)[:, :length]


def evaluate(scorer, tokenizer, paths: list[Path], limit: int | None, *, window: int = DEFAULT_WINDOW,
             first_bucket: int = FIRST_BUCKET) -> dict:
    """Scores the .txt documents of the folder `paths[0]`; `limit` keeps the first N windows."""
    model = scorer.model
    length, note = window_length(model.config, window)
    documents, pieces = {}, []
    for path in list_documents(paths[0]):
        tokens = tokenizer.encode_ordinary(path.read_text(encoding="utf-8"))
        documents[path.name] = len(tokens)
        pieces.append(cut_windows(tokens, length))
    windows = np.concatenate(pieces)[:limit]
    if not len(windows):
        raise ValueError(f"no document in '{paths[0]}' has the {length + 1} tokens one window needs; "
                         f"lower --long_ppl_len or add longer documents")
    rows = max(1, scorer.batch_size * scorer.max_len // length)
    graphdef, params = nnx.split(model)
    nll_sum = np.zeros(length, np.float64)
    with tqdm(total=len(windows), desc="long_ppl", unit="window", disable=not scorer.progress, leave=False) as bar:
        for start in range(0, len(windows), rows):
            batch = windows[start : start + rows]
            padded = np.concatenate([batch, np.zeros((rows - len(batch), length + 1), np.int32)])  # one shape
            nll = np.asarray(jax.device_get(_window_nll(graphdef, params, jnp.asarray(padded))), np.float64)
            nll_sum += nll[: len(batch)].sum(axis=0)
            bar.update(len(batch))
    results = {"window": length, "requested_window": window}
    if note:
        results["note"] = note
    return {**results, "train_len": model.config.block_size, "documents": documents,
            **summarize(nll_sum, len(windows), first_bucket), "tokens": len(windows) * length,
            "samples": len(windows)}
