"""Log-likelihoods of token continuations under a GPT, batched and padded to a few fixed shapes.

A request is (context tokens, continuation tokens). As lm-evaluation-harness does, the model reads
`(context + continuation)[-(max_len + 1):][:-1]` and the continuation is scored at the last
positions, so an over-long context is cut on the left. Log-probabilities are normalised over all
`padded_vocab_size` logits, as nanoGPT's loss does and lm-eval does on the PyTorch model with its
padded head (the padding rows are never targets, so training drives their probability towards zero).

Batches are padded to a length from `bucket_lengths` (powers of two up to the context length) and
hold about `batch_size` x context length tokens (more rows when shorter), so jit compiles each function
a handful of times whatever the data, and each batch needs about the same memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxlin.data.tokenizer import EOT_TOKEN

Pair = tuple[list[int], list[int]]
MIN_BUCKET = 32


def bucket_lengths(max_len: int) -> list[int]:
    lengths = [MIN_BUCKET]
    while lengths[-1] < max_len:
        lengths.append(lengths[-1] * 2)
    return [n for n in lengths if n < max_len] + [max_len]


def _bucket(n: int, max_len: int) -> int:
    return next(b for b in bucket_lengths(max_len) if b >= n)


def _fetch_behind(jobs):
    """Yields each (job, device result) as (job, host result), fetching one job late: the next
    job is dispatched before the previous result is awaited, so the device never waits on Python."""
    previous = None
    for job in jobs:
        if previous is not None:
            yield previous[0], jax.device_get(previous[1])
        previous = job
    if previous is not None:
        yield previous[0], jax.device_get(previous[1])


def _target_scores(logits, targets):
    """log P(target) and whether it is the argmax, per position."""
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


# The graphdef is a static argument: scorers of same-shaped models share the compiled functions.
@functools.partial(jax.jit, static_argnums=0)
def _full_scores(graphdef, params, tokens, targets):
    return _target_scores(nnx.merge(graphdef, params)(tokens), targets)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, params, tokens, segment_ids):
    """Runs left-padded contexts; returns the last position's logits and the recurrent state."""
    model = nnx.merge(graphdef, params)
    hidden, state = model.hidden(tokens, segment_ids=segment_ids, return_state=True)
    return model.logits(hidden[:, -1:])[:, 0], state


@jax.jit
def _pick_rows(state, last_logits, rows):
    """The prefill's state and last logits for each continuation row. Apart from `_extend`, so that
    the model compiles once per continuation shape, whatever the prefill's batch was."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), state), last_logits[rows]


@functools.partial(jax.jit, static_argnums=0)
def _extend(graphdef, params, state, first_logits, tokens):
    """Scores continuations `tokens` [R, L], row r continuing from row r of `state`."""
    logits = nnx.merge(graphdef, params)(tokens, state=state)
    # The context's last logits predict the first token; position t predicts token t + 1.
    logits = jnp.concatenate([first_logits[:, None], logits[:, :-1]], axis=1)
    return _target_scores(logits, tokens)[0]


class Scorer:
    def __init__(self, model, *, max_len: int | None = None, batch_size: int = 32, progress: bool = True):
        config = model.config
        self.model = model
        self.max_len = max_len or config.block_size
        if config.uses_pos_embedding and self.max_len > config.block_size:
            raise ValueError(f"seq_len {self.max_len} exceeds the model's position embedding "
                             f"(block_size={config.block_size})")
        self.batch_size = batch_size
        self.progress = progress
        # Continuing from a state restarts positions at 0, so only models without positions may reuse it.
        self.reuses_state = model.supports_state and not config.uses_pos_embedding
        graphdef, params = nnx.split(model)
        self._full = functools.partial(_full_scores, graphdef, params)
        self._prefill = functools.partial(_prefill, graphdef, params)
        self._extend = functools.partial(_extend, graphdef, params)

    def _batches(self, items: list, length):
        """Splits `items`, sorted longest first, into batches; yields (batch, padded length, rows)."""
        start = 0
        while start < len(items):
            padded = _bucket(length(items[start]), self.max_len)
            rows = max(1, self.batch_size * self.max_len // padded)
            yield items[start : start + rows], padded, rows
            start += rows

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="seq", disable=not self.progress, leave=False)

    def _check(self, requests: list[Pair]):
        """Raises ValueError for a request that cannot be scored, before any work."""
        for context, continuation in requests:
            if not context:
                raise ValueError("empty context: give at least one token (the harness gives EOT)")
            if not 1 <= len(continuation) <= self.max_len:
                raise ValueError(f"continuation of {len(continuation)} tokens: it must have 1 to "
                                 f"max_len={self.max_len} tokens")

    def loglikelihood(self, requests: list[Pair], desc: str = "scoring") -> list[tuple[float, bool]]:
        """(sum of log P(continuation | context), whether every continuation token is the argmax)."""
        self._check(requests)
        rows = [(list(context) + list(continuation))[-(self.max_len + 1) :] for context, continuation in requests]
        results = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
        with self._bar(len(rows), desc) as bar:
            for batch, (logp, greedy) in _fetch_behind(self._full_batches(rows, order)):
                for r, i in enumerate(batch):
                    end = len(rows[i]) - 1
                    span = slice(end - len(requests[i][1]), end)
                    results[i] = (float(logp[r, span].sum(dtype=np.float64)), bool(greedy[r, span].all()))
                bar.update(len(batch))
        return results

    def _full_batches(self, rows: list[list[int]], order: list[int]):
        for batch, length, n_rows in self._batches(order, lambda i: len(rows[i]) - 1):
            tokens = np.full((n_rows, length + 1), EOT_TOKEN, np.int32)
            for r, i in enumerate(batch):
                tokens[r, : len(rows[i])] = rows[i]
            yield batch, self._full(tokens[:, :-1], tokens[:, 1:])

    def choice_loglikelihoods(self, groups: list[list[Pair]], desc: str = "choices") -> list[list[float]]:
        """log P(continuation | context) for each pair of each group (one group per question).

        A group whose pairs share their context, on a recurrent model, runs the context once and
        continues every choice from its state; the rest score each pair as a full sequence.
        """
        self._check([pair for pairs in groups for pair in pairs])
        results = [[0.0] * len(pairs) for pairs in groups]
        shared, separate = [], []
        for g, pairs in enumerate(groups):
            context = pairs[0][0]
            fits = all(len(context) + len(c) - 1 <= self.max_len for _, c in pairs)  # else the harness truncates
            reusable = self.reuses_state and fits and all(p[0] == context for p in pairs)
            (shared if reusable else separate).append(g)
        flat = [(g, j) for g in separate for j in range(len(groups[g]))]
        if flat:
            for (g, j), (ll, _) in zip(flat, self.loglikelihood([groups[g][j] for g, j in flat], desc)):
                results[g][j] = ll
        if shared:
            self._shared_contexts(groups, shared, results, desc)
        return results

    def _shared_contexts(self, groups, shared: list[int], results, desc: str):
        with self._bar(sum(len(groups[g]) for g in shared), desc) as bar:
            for chunk, logp in _fetch_behind(self._shared_context_batches(groups, shared)):
                for k, (g, j) in enumerate(chunk):
                    results[g][j] = float(logp[k, : len(groups[g][j][1])].sum(dtype=np.float64))
                bar.update(len(chunk))

    def _shared_context_batches(self, groups, shared: list[int]):
        """Prefills batches of contexts, then yields (chunk of (group, choice), device log-probs) for
        their continuations, each continuing its context's state."""
        by_context = sorted(shared, key=lambda g: -len(groups[g][0][0]))
        for batch, length, n_rows in self._batches(by_context, lambda g: len(groups[g][0][0])):
            # Left-pad the contexts so each ends at the last position; pads (segment -1) leave no state.
            tokens = np.full((n_rows, length), EOT_TOKEN, np.int32)
            segments = np.full((n_rows, length), -1, np.int32)
            for r, g in enumerate(batch):
                context = groups[g][0][0]
                tokens[r, length - len(context) :] = context
                segments[r, length - len(context) :] = 0
            last_logits, state = self._prefill(tokens, segments)
            endings = sorted(((r, g, j) for r, g in enumerate(batch) for j in range(len(groups[g]))),
                             key=lambda e: -len(groups[e[1]][e[2]][1]))
            for chunk, length, n_rows in self._batches(endings, lambda e: len(groups[e[1]][e[2]][1])):
                rows = np.zeros(n_rows, np.int32)
                continuations = np.full((n_rows, length), EOT_TOKEN, np.int32)
                for k, (r, g, j) in enumerate(chunk):
                    rows[k], continuations[k, : len(groups[g][j][1])] = r, groups[g][j][1]
                picked_state, first_logits = _pick_rows(state, last_logits, rows)
                yield [(g, j) for _, g, j in chunk], self._extend(picked_state, first_logits, continuations)
