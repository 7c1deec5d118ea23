import json

import grain
import numpy as np
import pytest

from jaxlin.data.pipeline import TokenWindows, make_train_iterator, make_val_dataset, windows_to_example
from jaxlin.data.shards import write_shard
from jaxlin.data.tokenizer import EOT_TOKEN

SEQ = 8


@pytest.fixture
def shards(tmp_path):
    """Two shards of distinct tokens: 6 + 4 windows of SEQ + 1 (the 2 leftover tokens are dropped)."""
    return [write_shard(tmp_path / "train_000000.bin", np.arange(6 * SEQ + 1)),
            write_shard(tmp_path / "train_000001.bin", np.arange(1000, 1000 + 4 * SEQ + 2))]


def _train(shards, batch=2, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return make_train_iterator(shards, SEQ, batch, **kwargs)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _window_ids(batches):
    """A window is named by its first token (all tokens differ)."""
    return [int(x) for b in batches for x in b["inputs"][:, 0]]


def test_windows_stay_inside_shards(shards):
    windows = TokenWindows(shards, SEQ)
    assert len(windows) == 10
    np.testing.assert_array_equal(windows[5], np.arange(5 * SEQ, 6 * SEQ + 1))
    np.testing.assert_array_equal(windows[6], np.arange(1000, 1000 + SEQ + 1))
    with pytest.raises(IndexError):
        windows[10]


def test_targets_are_inputs_shifted_by_one(shards):
    for batch in _take(_train(shards), 5):
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        assert batch["inputs"].shape == batch["targets"].shape == (2, SEQ)
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        np.testing.assert_array_equal(batch["targets"][:, -1], batch["inputs"][:, -1] + 1)


def test_same_seed_same_batches_and_each_epoch_reshuffled(shards):
    first, again, other = (_window_ids(_take(_train(shards, seed=s), 10)) for s in (3, 3, 4))
    assert first == again and first != other
    starts = sorted([*range(0, 6 * SEQ, SEQ), *range(1000, 1000 + 4 * SEQ, SEQ)])
    epochs = first[:10], first[10:]
    assert sorted(epochs[0]) == sorted(epochs[1]) == starts and epochs[0] != epochs[1]


@pytest.mark.parametrize("count", [2, 5])
def test_process_shards_are_disjoint_and_cover_each_epoch(shards, count):
    per_process = [_window_ids(_take(_train(shards, batch=1, process_index=i, process_count=count), 10 // count))
                   for i in range(count)]
    seen = [w for ids in per_process for w in ids]
    assert len(set(seen)) == len(seen) == 10


def test_state_restore_continues_the_same_sequence(shards):
    iterator = _train(shards, seed=7)
    _take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = _window_ids(_take(iterator, 8))
    resumed = _train(shards, seed=7)
    resumed.set_state(state)
    assert _window_ids(_take(resumed, 8)) == expected


def test_orbax_checkpoint_round_trip(shards, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    iterator = _train(shards, seed=1)
    _take(iterator, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    expected = _window_ids(_take(iterator, 6))
    resumed = _train(shards, seed=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert _window_ids(_take(resumed, 6)) == expected


def test_val_is_ordered_finite_repeatable_and_split_by_process(shards):
    val = make_val_dataset(shards, SEQ, 2, process_index=0, process_count=1)
    ids = _window_ids(list(val))
    assert ids == _window_ids(list(val)) == [*range(0, 6 * SEQ, SEQ), *range(1000, 1000 + 4 * SEQ, SEQ)]
    assert len(list(make_val_dataset(shards, SEQ, 2, num_batches=3, process_index=0, process_count=1))) == 3
    # 3 processes: 10 // 3 = 3 windows each -> one batch of 2 each, from the first 6 windows.
    split = [_window_ids(make_val_dataset(shards, SEQ, 2, process_index=i, process_count=3)) for i in range(3)]
    assert [len(s) for s in split] == [2, 2, 2] and sorted(sum(split, [])) == ids[:6]


def test_too_little_data_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="cannot fill one batch"):
        _train(shards, batch=11)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_val_dataset(shards, SEQ, 4, process_index=0, process_count=3)


def test_segment_ids_step_at_each_eot():
    windows = np.array([[5, EOT_TOKEN, 7, 8, EOT_TOKEN, EOT_TOKEN, 9]])
    example = windows_to_example(windows, segment_ids=True)
    np.testing.assert_array_equal(example["segment_ids"], [[0, 1, 1, 1, 2, 3]])
    assert "segment_ids" not in windows_to_example(windows)


def test_train_iterator_can_emit_segment_ids(shards):
    batch = next(_train(shards, segment_ids=True))
    assert batch["segment_ids"].shape == (2, SEQ) and batch["segment_ids"].dtype == np.int32
