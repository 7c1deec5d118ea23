"""Grain pipelines over token shards: fixed-length windows -> {"inputs", "targets"} batches.

Window i of a shard holds tokens [i*T, i*T + T + 1) (stride T, as nanoGPT): inputs are its first T
tokens, targets its last T. Windows never cross shards. Training shuffles all windows with a seed,
reshuffles every epoch, repeats forever and deals the global stream round-robin to processes, so
the union of one step's per-process batches is the same whatever the process count. The returned
iterator's state is a step counter: `get_state()/set_state()` and Orbax (see `make_train_iterator`)
resume the exact batch sequence.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence

import grain
import numpy as np

from jaxlin.data.shards import read_shard
from jaxlin.data.tokenizer import EOT_TOKEN
from jaxlin.errors import DataError

log = logging.getLogger(__name__)


class TokenWindows:
    """Random access to the `seq_len + 1`-token windows of memory-mapped shards (a Grain source)."""

    def __init__(self, shard_paths: Sequence[str | os.PathLike], seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if not shard_paths:
            raise ValueError("no shards given")
        self.seq_len = seq_len
        self.shards = [read_shard(p) for p in shard_paths]
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.first_window = np.cumsum([0, *counts])  # first_window[k]: index of shard k's first window

    def __len__(self) -> int:
        return int(self.first_window[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self.first_window, index, side="right")) - 1
        start = (index - int(self.first_window[shard])) * self.seq_len
        return np.array(self.shards[shard][start : start + self.seq_len + 1])


def make_train_iterator(
    shard_paths: Sequence[str | os.PathLike],
    seq_len: int,
    batch_size: int,
    *,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    segment_ids: bool = False,
    num_threads: int = 2,
    prefetch_batches: int = 8,
) -> grain.DatasetIterator:
    """Endless shuffled batches of `batch_size` (per process) windows, prefetched on threads.

    Checkpoint it with Orbax next to the train state (grain registers the handler on import):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=grain.checkpoint.CheckpointSave(iterator)))
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))
    Restoring sets the state of `iterator` in place (build it with the same arguments first).
    """
    index, count = _process(process_index, process_count)
    windows = grain.MapDataset.source(TokenWindows(shard_paths, seq_len))
    if len(windows) < batch_size * count:
        raise DataError(f"{len(windows)} windows of {seq_len + 1} tokens cannot fill one batch of "
                         f"{batch_size} on each of {count} processes: add data or lower seq_len/batch_size")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
    # shuffle before repeat: grain then draws a fresh permutation for every epoch.
    stream = windows.shuffle(seed).repeat()[index::count]
    return _batched(stream, batch_size, segment_ids, num_threads, prefetch_batches).__iter__()


def make_val_dataset(
    shard_paths: Sequence[str | os.PathLike],
    seq_len: int,
    batch_size: int,
    *,
    num_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    segment_ids: bool = False,
) -> grain.IterDataset:
    """The first `num_batches` batches (all when None) per process, in order, no shuffle.

    Every `iter()` over it starts again from the first batch. All processes get the same number of
    batches (their windows interleave), so collective evaluation steps stay in lockstep.
    """
    index, count = _process(process_index, process_count)
    windows = grain.MapDataset.source(TokenWindows(shard_paths, seq_len))
    available = len(windows) // count // batch_size
    if available == 0:
        raise DataError(f"{len(windows)} validation windows of {seq_len + 1} tokens cannot fill one batch of "
                         f"{batch_size} on each of {count} processes: add validation data or lower the batch")
    if num_batches is not None and num_batches > available:
        log.warning("asked for %d validation batches, the data holds %d: using %d", num_batches, available, available)
    batches = available if num_batches is None else min(num_batches, available)
    stream = windows[: batches * batch_size * count][index::count]
    return _batched(stream, batch_size, segment_ids, num_threads=1, prefetch_batches=2)


def _batched(stream, batch_size, segment_ids, num_threads, prefetch_batches) -> grain.IterDataset:
    batches = stream.batch(batch_size, drop_remainder=True)
    examples = batches.map(functools.partial(windows_to_example, segment_ids=segment_ids))
    return examples.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))


def windows_to_example(windows: np.ndarray, segment_ids: bool = False) -> dict[str, np.ndarray]:
    """[b, T+1] windows -> int32 inputs/targets [b, T]; with `segment_ids`, an id per document.

    Each document starts with EOT (llm.c convention), so the id steps up *at* each EOT: the EOT
    belongs to the document it opens, and a state reset at a new id never carries context across.
    """
    windows = windows.astype(np.int32)
    example = {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
    if segment_ids:
        example["segment_ids"] = np.cumsum(example["inputs"] == EOT_TOKEN, axis=1, dtype=np.int32)
    return example


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax  # only when not given: tests and tools need no JAX backend

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} must lie in [0, process_count={count})")
    return index, count
