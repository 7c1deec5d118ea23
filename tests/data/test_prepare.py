import concurrent.futures
import csv
import gzip
import json
import time
import zipfile

import numpy as np
import pytest

from jaxlin.data import prepare, readers
from jaxlin.data.pipeline import make_train_iterator
from jaxlin.data.shards import read_shard, write_shard
from jaxlin.data.tokenizer import EOT_TOKEN, get_tokenizer


@pytest.fixture(scope="module")
def sources(data_dir, tmp_path_factory):
    """A few hundred KB of the real corpus, in each supported format."""
    folder = tmp_path_factory.mktemp("sources")
    text = (data_dir / "train_corpus/tinyshakespeare_input.txt").read_text()[:100_000]
    (folder / "shakespeare.txt").write_text(text)
    with gzip.open(data_dir / "train_corpus_extra/rust_blog_mit_apache2.jsonl.gz", "rt") as f:
        records = [json.loads(next(f)) for _ in range(40)]
    with gzip.open(folder / "rust.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": r["text"], "title": r["title"]}) + "\n" for r in records)
    with zipfile.ZipFile(data_dir / "train_corpus/nltk_movie_reviews.zip") as real, \
            zipfile.ZipFile(folder / "reviews.zip", "w") as small:
        names = [n for n in real.namelist() if n.endswith(".txt")][:12] + ["movie_reviews/README"]
        for name in names:
            small.writestr(name, real.read(name))
    return folder, text, [r["text"] for r in records]


def _tokens(paths):
    return np.concatenate([np.asarray(read_shard(p)) for p in paths]) if paths else np.zeros(0, np.uint16)


def _with_eot(encoding, text):
    return [EOT_TOKEN, *encoding.encode_ordinary(text)]


def test_documents_get_eot_prefix_and_every_nth_is_val(data_dir, sources, tmp_path):
    folder, text, docs = sources
    train, val = prepare.prepare_corpus([str(folder / "rust.jsonl.gz"), str(folder / "shakespeare.txt")],
                                        tmp_path / "out", data_dir, val_fraction=0.1)
    encoding = get_tokenizer(data_dir)
    # jsonl: documents 9, 19, 29, 39 are validation. One .txt document (< 10 documents): its last
    # tenth of tokens is validation, behind a fresh EOT.
    shakespeare = _with_eot(encoding, text)
    cut = len(shakespeare) - round(len(shakespeare) / 10)
    expected_train = [t for i, d in enumerate(docs) if i % 10 != 9 for t in _with_eot(encoding, d)]
    expected_val = [t for i, d in enumerate(docs) if i % 10 == 9 for t in _with_eot(encoding, d)]
    np.testing.assert_array_equal(_tokens(train), expected_train + shakespeare[:cut])
    np.testing.assert_array_equal(_tokens(val), expected_val + [EOT_TOKEN] + shakespeare[cut:])
    manifest = json.loads((tmp_path / "out" / prepare.MANIFEST).read_text())
    assert manifest["train_tokens"] == len(expected_train) + cut
    assert [s["path"] for s in manifest["inputs"]["sources"]][0].endswith("rust.jsonl.gz")


def test_second_run_reuses_shards_and_changes_rebuild(data_dir, sources, tmp_path, monkeypatch):
    folder, _, _ = sources
    source = tmp_path / "doc.txt"
    source.write_text((folder / "shakespeare.txt").read_text()[:20_000])
    out = tmp_path / "out"
    first = prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.05)
    mtimes = {p: p.stat().st_mtime_ns for p in first[0] + first[1]}

    calls = []
    original = prepare._tokenize
    monkeypatch.setattr(prepare, "_tokenize", lambda *a: calls.append(1) or original(*a))
    assert prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.05) == first
    assert calls == [] and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.2)  # other settings
    assert calls == [1]
    source.write_text(source.read_text() + "\nAnd one more line.")  # other input
    train, _ = prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.2)
    assert calls == [1, 1]
    (out / train[0].name).write_bytes(b"garbage")  # damaged shard
    prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.2)
    assert calls == [1, 1, 1]


def test_builds_started_together_tokenise_once(data_dir, sources, tmp_path, monkeypatch):
    folder, _, _ = sources
    source = tmp_path / "doc.txt"
    source.write_text((folder / "shakespeare.txt").read_text()[:20_000])
    builds, original = [], prepare._build

    def slow_build(*args):
        builds.append(1)
        time.sleep(0.5)  # the other caller arrives while this one builds
        return original(*args)

    monkeypatch.setattr(prepare, "_build", slow_build)
    build = lambda: prepare.prepare_corpus([str(source)], tmp_path / "out", data_dir, val_fraction=0.05)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = [f.result() for f in [pool.submit(build) for _ in range(2)]]
    assert builds == [1] and results[0] == results[1] and results[0][1]


def test_shard_size_splits_the_stream(data_dir, sources, tmp_path):
    folder, _, _ = sources
    train, val = prepare.prepare_corpus([str(folder / "rust.jsonl.gz")], tmp_path, data_dir, 0.0, shard_tokens=5000)
    sizes = [len(read_shard(p)) for p in train]
    assert val == [] and len(train) > 2 and set(sizes[:-1]) == {5000} and 0 < sizes[-1] <= 5000


def test_readers_txt_separator_csv_zip(data_dir, sources, tmp_path):
    folder, text, _ = sources
    assert list(readers.iter_documents(folder / "shakespeare.txt", separator="\n\n")) == \
        [d for d in text.split("\n\n") if d.strip()]
    reviews = list(readers.iter_documents(folder / "reviews.zip"))
    assert len(reviews) == 12  # README and folders skipped
    rows = list(readers.iter_documents(data_dir / "train_corpus/fineweb_edu_sample10BT_150docs_annotated.csv"))
    assert len(rows) == 150 and rows[0].startswith("The Independent Jane")
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows([["body"], ["hello"]])
    with pytest.raises(ValueError, match="no column 'text'.*text_field"):
        list(readers.iter_documents(bad))
    with pytest.raises(ValueError, match="no field 'content'"):
        list(readers.iter_documents(folder / "rust.jsonl.gz", text_field="content"))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(readers.iter_documents(tmp_path / "x.parquet"))


def test_parquet_source(data_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["first document", "second one"], "id": [1, 2]}), tmp_path / "a.parquet")
    assert list(readers.iter_documents(tmp_path / "a.parquet")) == ["first document", "second one"]


def test_globs_folders_and_ready_shards(data_dir, sources, tmp_path):
    folder, _, _ = sources
    texts, shards = prepare.resolve_sources([str(folder / "*.txt"), str(folder)], data_dir)
    assert [p.name for p in texts] == ["shakespeare.txt", "reviews.zip", "rust.jsonl.gz"] and shards == []
    bins = tmp_path / "fineweb10B"
    write_shard(bins / "fineweb_val_000000.bin", np.arange(100))
    write_shard(bins / "fineweb_train_000001.bin", np.arange(200))
    train, val = prepare.prepare_corpus([str(bins)], tmp_path / "unused", data_dir)
    assert [p.name for p in train] == ["fineweb_train_000001.bin"] and [p.name for p in val] == ["fineweb_val_000000.bin"]
    assert not (tmp_path / "unused").exists()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare.resolve_sources([str(folder / "*.md")], data_dir)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="unknown format"):
        prepare.resolve_sources([str(tmp_path / "notes.md")], data_dir)


def test_command_line_then_pipeline_decodes_real_text(data_dir, sources, tmp_path, capsys):
    folder, text, _ = sources
    prepare.main(["--data_dir", str(data_dir), "--out", str(tmp_path), "--sources", str(folder / "shakespeare.txt"),
                  "--val_fraction", "0.1", "--separator", r"\n\n"])
    paths = json.loads(capsys.readouterr().out)
    assert len(paths["train"]) == 1 and len(paths["val"]) == 1
    batch = next(make_train_iterator(paths["train"], 32, 2, process_index=0, process_count=1))
    window = get_tokenizer(data_dir).decode(batch["inputs"][0].tolist())
    assert all(piece in text for piece in window.split("<|endoftext|>"))


def test_a_folder_of_someone_elses_shards_is_never_cleaned(data_dir, tmp_path):
    source = tmp_path / "doc.txt"
    source.write_text("Some words to tokenise. " * 200)
    out = tmp_path / "mine"
    write_shard(out / "train_000000.bin", np.arange(10))  # the user's own shards, no manifest
    write_shard(out / "val_000000.bin", np.arange(5))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="holds .bin shards jaxlin did not write.*train_000000.bin.*data.sources"):
        prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "val_000000.bin").unlink()
    (out / prepare.MANIFEST).write_text('{"name": "my dataset"}')  # a manifest jaxlin did not write
    with pytest.raises(ValueError, match="was not written by jaxlin"):
        prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.1)


def test_a_rebuild_deletes_only_the_files_its_manifest_lists(data_dir, tmp_path):
    source = tmp_path / "doc.txt"
    source.write_text("Some words to tokenise. " * 200)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train_extra.partial").write_text("mine too")
    train, val = prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.1, shard_tokens=300)
    assert len(train) > 1
    source.write_text("Other words. " * 100)  # a rebuild with fewer shards
    prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.1, shard_tokens=300)
    assert (out / "notes.txt").read_text() == "mine" and (out / "train_extra.partial").read_text() == "mine too"
    manifest = json.loads((out / prepare.MANIFEST).read_text())
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(manifest["train"] + manifest["val"])


def test_an_interrupted_build_is_not_reused_and_its_files_are_known(data_dir, tmp_path, monkeypatch):
    source = tmp_path / "doc.txt"
    source.write_text("Some words to tokenise. " * 200)
    out = tmp_path / "out"

    def fail(*args):
        raise KeyboardInterrupt
    real = prepare._ShardWriter.close
    monkeypatch.setattr(prepare._ShardWriter, "close", lambda self: real(self) if self.prefix == "train" else fail())
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.1)
    assert json.loads((out / prepare.MANIFEST).read_text())["complete"] is False
    monkeypatch.undo()
    train, val = prepare.prepare_corpus([str(source)], out, data_dir, val_fraction=0.1)  # rebuilds, not refused
    assert train and val


def test_token_ids_beyond_the_vocabulary_name_the_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = write_shard(tmp_path / "good.bin", np.arange(50257))
    bad = write_shard(tmp_path / "bad.bin", np.array([5, 60000, 7]))
    prepare.check_token_ids([good], vocab_size=50257)
    with pytest.raises(ValueError, match=r"shard '.*bad.bin' holds token id 60000, but model.vocab_size is 50257"):
        prepare.check_token_ids([good, bad], vocab_size=50257)
    cache = json.loads((tmp_path / "cache" / "jaxlin" / "shard_max_token_ids.json").read_text())
    assert sorted(cache.values()) == [50256, 60000]  # each shard is scanned once


@pytest.mark.parametrize("name, data, message", [
    ("utf16.txt", "hello world\n".encode("utf-16"), "is not valid utf-8 at byte 0"),
    ("utf16le.txt", "hello world\n".encode("utf-16-le"), "holds a NUL character .*UTF-16"),
    ("latin1.txt", "caf\xe9 ok".encode("latin-1"), "is not valid utf-8 at byte 3"),
    ("latin1.jsonl", '{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"), "is not valid utf-8 at byte 28"),
    ("latin1.csv", 'text\nok\n"caf\xe9"\n'.encode("latin-1"), "is not valid utf-8 at byte 12"),
])
def test_text_that_does_not_decode_names_file_and_byte(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=f"'{tmp_path / name}' {message}.*set data.encoding"):
        list(readers.iter_documents(tmp_path / name))


def test_encoding_setting_decodes_other_encodings(data_dir, tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9 au lait"}\n'.encode("latin-1"))
    (tmp_path / "utf16.txt").write_bytes("na\xefve text".encode("utf-16"))
    assert list(readers.iter_documents(tmp_path / "latin1.jsonl", encoding="latin-1")) == ["caf\xe9 au lait"]
    assert list(readers.iter_documents(tmp_path / "utf16.txt", encoding="utf-16")) == ["na\xefve text"]
    train, _ = prepare.prepare_corpus([str(tmp_path / "utf16.txt")], tmp_path / "out", data_dir,
                                      val_fraction=0.0, encoding="utf-16")
    assert _tokens(train).tolist() == _with_eot(get_tokenizer(data_dir), "na\xefve text")
