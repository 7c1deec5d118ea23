"""Generation from a GPT: one jitted prefill, then decoding in jitted blocks of tokens, each block one
loop of a fixed number of steps over a donated cache (no Python between tokens). Between blocks the host
collects the new tokens, to stream them and to check stop strings, and ends once every row has stopped.

A loop of fixed length is one whose trip count XLA knows: on a GPU it then runs the steps back to back.
A loop that could exit early (every row stopped) makes the GPU send its predicate to the host after every
token and wait for the next step's kernels to be launched, which a profile of the GPT-2 Medium decode step
showed as the GPU's largest idle gap (H100, 2026-12-06: 0.51 ms a token, after that copy)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlin.data.tokenizer import EOT_TOKEN
from jaxlin.generate.cache import decode_step, for_decoding, init_cache, prefill
from jaxlin.generate.sampling import GREEDY, Sampling, row_keys, sample
from jaxlin.model import GPT

NO_TOKEN = -1  # in a block's output: the row had already stopped, or the step is past the last one asked for
DEFAULT_BLOCK = 32  # decode steps per jitted block: a generation ends at most this many steps after its rows stop
MIN_PROMPT_BUCKET = 16  # prompts are left-padded to a power of two from here (few shapes to compile)
# On a GPU a recurrent model decodes at least this many rows: a lone prompt beside a stopped copy of itself.
# At one row XLA's GPU compiler runs the layers' products as reductions, slower than the GEMMs of two rows
# (GPT-2 Medium GLA on an H100: 1.610 ms a step at one row, 1.451 at two; docs/generation.md). Elsewhere
# the copy would only double the work.
MIN_DECODE_ROWS = 2


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "padded", "cache_size"))
def _prefill(graphdef, params, head, tokens, start, *, chunk, padded, cache_size):
    model = nnx.merge(graphdef, params)
    return prefill(model, head, tokens, init_cache(model, start, cache_size), chunk=chunk, padded=padded)


def _decode_steps(graphdef, params, head, keys, carry, limit, *, sampling, vocab_size, steps, stop_tokens):
    """`steps` decode steps. `carry`: the cache, the logits of each row's next token, `done` [B] and
    `count` (tokens generated so far, the sampling step). Returns the new carry and the tokens [B, steps]:
    NO_TOKEN once a row is done and from step `limit` on. The steps from `limit` on still run (the loop
    has a fixed length) on whatever they find, a KV cache's last slot and the last position included: a
    carry that went past `limit` is not one to continue from."""
    model = nnx.merge(graphdef, params)
    stops = jnp.asarray(stop_tokens, jnp.int32)

    def body(carry, i):
        token = sample(carry["logits"], keys, carry["count"], sampling, vocab_size)
        token = jnp.where(carry["done"] | (i >= limit), NO_TOKEN, token)
        done = carry["done"] | jnp.isin(token, stops)
        logits, cache = decode_step(model, head, jnp.maximum(token, 0), carry["cache"])
        return {"cache": cache, "logits": logits, "done": done, "count": carry["count"] + 1}, token

    carry, tokens = jax.lax.scan(body, carry, jnp.arange(steps))
    return carry, tokens.T


_DECODE_JIT = dict(static_argnames=("graphdef", "sampling", "vocab_size", "steps", "stop_tokens"),
                   donate_argnames=("carry",))
decode_block = jax.jit(_decode_steps, **_DECODE_JIT)
# The same, with XLA's GPU autotuner trying every tiling of the decode step's products (split-K ones among
# them), not just its short list. GPT-2 Medium on an H100 at batch 1: GLA 0.786-0.789 against 0.871-0.913 ms
# a step, Gated DeltaNet 0.825 against 0.909-0.945, softmax the same; the compile several times longer (GLA's
# loops for batch 1 and 64: 77-87 s against 7-10; docs/generation.md). Other backends ignore the option.
decode_block_autotuned = jax.jit(_decode_steps, **_DECODE_JIT,
                                 compiler_options={"xla_gpu_exhaustive_tiling_search": True})


def pad_rows(tree, rows: int):
    """`tree` (a cache, logits, keys: arrays whose first axis is the row) with copies of its first row
    appended up to `rows` rows; scalars (the cache's length) as they are."""
    def pad(x):
        if x.ndim == 0 or x.shape[0] >= rows:
            return x
        return jnp.concatenate([x, jnp.repeat(x[:1], rows - x.shape[0], axis=0)])
    return jax.tree.map(pad, tree)


def start_decoding(cache: dict, logits, rows: int) -> dict:
    """The first carry of `decode_block` for the prefilled `cache` and its rows' next-token `logits`, padded
    to `rows` rows: those past the prefilled ones copy the first and are done from the start."""
    return {"cache": pad_rows(cache, rows), "logits": pad_rows(logits, rows),
            "done": jnp.arange(rows) >= logits.shape[0], "count": jnp.zeros((), jnp.int32)}


def prompt_length_bucket(n: int, chunk: int) -> int:
    """The padded prompt length: a power of two from MIN_PROMPT_BUCKET up to `chunk`, then multiples of it."""
    if n > chunk:
        return -(-n // chunk) * chunk
    return min(chunk, max(MIN_PROMPT_BUCKET, 1 << (n - 1).bit_length()))


class Generator:
    """Generation from `model`, its weights cast once for decoding (see `for_decoding`). `exhaustive_autotune`:
    decode with `decode_block_autotuned` (faster recurrent decoding at batch 1 on a GPU, for a first compile
    several times longer)."""

    def __init__(self, model: GPT, *, exhaustive_autotune: bool = False):
        self.config = model.config
        self.decode_steps = decode_block_autotuned if exhaustive_autotune else decode_block
        model = for_decoding(model)
        self.graphdef, self.params = nnx.split(model)
        self.head = model.wte[...].astype(self.config.compute_dtype)
        self.has_kv_cache = "softmax" in self.config.per_layer("attn")
        self.min_decode_rows = MIN_DECODE_ROWS if jax.default_backend() == "gpu" else 1

    def decode_rows(self, rows: int) -> int:
        """Rows a decode step runs for `rows` asked: `min_decode_rows` at least for a recurrent model (a KV
        cache would be read once more for the copy)."""
        return rows if self.has_kv_cache else max(rows, self.min_decode_rows)

    def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        """Raises ValueError naming the problem with these prompts, before any work."""
        cfg = self.config
        if not prompts:
            raise ValueError("no prompts: give at least one")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token")
            bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has tokens outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
            if cfg.uses_pos_embedding and len(prompt) >= cfg.block_size:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens but the model's position embedding holds "
                                 f"block_size={cfg.block_size}: shorten the prompt")
            if cfg.uses_pos_embedding and len(prompt) + max_new_tokens > cfg.block_size:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it passes the "
                    f"model's position embedding (block_size={cfg.block_size}): shorten the prompt or lower "
                    f"max_new_tokens to {cfg.block_size - len(prompt)}")

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = GREEDY,
                 seed: int = 0, num_samples: int = 1, stop_tokens: Sequence[int] = (EOT_TOKEN,),
                 stop: Callable[[int, list[int]], bool] | None = None,
                 on_tokens: Callable[[list[list[int]]], None] | None = None, block: int | None = None,
                 prefill_chunk: int = 1024) -> list[list[int]]:
        """Continuations (token lists) of each prompt, `num_samples` rows per prompt, prompt-major.

        A row ends at a token of `stop_tokens` (not included), when `stop(row, tokens)` says so (checked
        between blocks; the tokens up to then are kept), or after `max_new_tokens`. `on_tokens` gets each
        row's new tokens after every block of `block` steps (default DEFAULT_BLOCK, at most
        `max_new_tokens`). Row j of a prompt samples from key fold_in(seed, j): its output does not depend
        on the other rows.
        """
        self.check(prompts, max_new_tokens)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if block is not None and block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        block = min(block or DEFAULT_BLOCK, max_new_tokens)
        rows = [list(p) for p in prompts for _ in range(num_samples)]
        keys = row_keys(seed, [j for _ in prompts for j in range(num_samples)])
        longest = max(map(len, rows))
        chunk = min(prefill_chunk, prompt_length_bucket(longest, prefill_chunk))
        length = prompt_length_bucket(longest, chunk)
        tokens = np.zeros((len(rows), length), np.int32)
        start = np.array([length - len(r) for r in rows], np.int32)
        for r, row in enumerate(rows):
            tokens[r, start[r]:] = row
        logits, cache = _prefill(self.graphdef, self.params, self.head, jnp.asarray(tokens), jnp.asarray(start),
                                 chunk=chunk, padded=bool(start.any()),
                                 cache_size=length + max_new_tokens if self.has_kv_cache else 0)
        asked, decoded = len(rows), self.decode_rows(len(rows))
        carry, keys = start_decoding(cache, logits, decoded), pad_rows(keys, decoded)  # copies' tokens never kept
        stop_tokens = tuple(sorted({int(t) for t in stop_tokens if 0 <= t < self.config.vocab_size}))
        outputs, finished, produced = [[] for _ in rows], [False] * asked + [True] * (decoded - asked), 0
        while produced < max_new_tokens and not all(finished):
            n = min(block, max_new_tokens - produced)
            carry, out = self.decode_steps(self.graphdef, self.params, self.head, keys, carry, jnp.int32(n),
                                           sampling=sampling, vocab_size=self.config.vocab_size, steps=block,
                                           stop_tokens=stop_tokens or (NO_TOKEN,))
            out = np.asarray(out[:asked, :n])
            produced += n
            new = [[] for _ in rows]
            for r, row_out in enumerate(out):
                for token in row_out:
                    if finished[r] or token == NO_TOKEN:
                        break
                    if token in stop_tokens:
                        finished[r] = True
                        break
                    new[r].append(int(token))
                outputs[r] += new[r]
                if not finished[r] and stop is not None and new[r] and stop(r, outputs[r]):
                    finished[r] = True
            if on_tokens is not None:
                on_tokens(new)
            carry["done"] = jnp.asarray(finished)
        return outputs


def generate(model: GPT, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """`Generator(model).generate(prompts, **kwargs)`."""
    return Generator(model).generate(prompts, **kwargs)
