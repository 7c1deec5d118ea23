import numpy as np
import pytest

from jaxlin.data.shards import HEADER_BYTES, MAGIC, read_shard, write_shard


def test_round_trip(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 15496], dtype=np.int64)
    path = write_shard(tmp_path / "a.bin", tokens)
    shard = read_shard(path)
    assert isinstance(shard, np.memmap) and shard.dtype == np.uint16
    np.testing.assert_array_equal(shard, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * len(tokens)
    assert not list(tmp_path.glob("*.partial"))


def test_empty_shard(tmp_path):
    assert len(read_shard(write_shard(tmp_path / "empty.bin", []))) == 0


def test_reads_llm_c_layout(tmp_path):
    # Written exactly as llm.c's dev/data/data_common.py write_datafile does.
    tokens = np.arange(1000, dtype=np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    path = tmp_path / "fineweb_val_000000.bin"
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    np.testing.assert_array_equal(read_shard(path), tokens)


def _corrupt(tmp_path, ints=None, drop_bytes=0):
    path = write_shard(tmp_path / "bad.bin", np.arange(10))
    data = bytearray(path.read_bytes())
    for index, value in (ints or {}).items():
        data[4 * index : 4 * index + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(data[: len(data) - drop_bytes]))
    return path


@pytest.mark.parametrize(
    "ints, drop_bytes, message",
    [
        ({0: 12345}, 0, f"magic 12345.*expected {MAGIC}"),
        ({0: 20240801}, 0, "Llama-3"),
        ({1: 2}, 0, "version 2; expected 1"),
        ({2: 11}, 0, "header counts 11 tokens"),
        ({}, 2, "truncated or corrupt"),
        ({}, 2 * 10 + 100, "shorter than its 1024-byte header"),
    ],
)
def test_corrupt_header_names_file_and_fault(tmp_path, ints, drop_bytes, message):
    path = _corrupt(tmp_path, ints, drop_bytes)
    with pytest.raises(ValueError, match=message) as error:
        read_shard(path)
    assert str(path) in str(error.value)


def test_write_rejects_tokens_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        write_shard(tmp_path / "x.bin", [70000])
