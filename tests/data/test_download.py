import bz2
import hashlib
import re
import shutil
import urllib.request
import zipfile

import pytest

from jaxlin.data import download
from jaxlin.data.download import DEFAULT_GROUPS, FILES, GROUPS, Remote, fetch, fetch_all


def test_url_table_shape():
    relpaths = [r.relpath for r in FILES]
    assert len(set(relpaths)) == len(relpaths)
    assert {r.group for r in FILES} == set(GROUPS) - {"pg19"} == set(DEFAULT_GROUPS)  # pg19: listed at fetch time
    for task_file in ("arc_challenge/ARC-Challenge-Test.jsonl", "boolq/val.jsonl", "copa/val.jsonl",
                      "openbookqa/test.tsv", "long_books/melville_moby_dick.txt"):
        assert task_file in relpaths
    for index, remote in enumerate(FILES):
        assert remote.url.startswith("https://"), remote
        assert remote.sha256 is None or re.fullmatch("[0-9a-f]{64}", remote.sha256), remote
        assert remote.member is None or remote.url.endswith(".zip"), remote
        assert remote.copy_of is None or remote.copy_of in relpaths[:index], remote


def _content_sha256(path):
    data = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def test_hashes_match_the_shared_copies(data_dir):
    checked = 0
    for remote in FILES:
        path = data_dir / remote.relpath
        if remote.sha256 and path.exists():
            assert _content_sha256(path) == remote.sha256, remote.relpath
            checked += 1
    assert checked >= 21


def test_files_present_are_skipped_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    for remote in FILES:
        (tmp_path / remote.relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / remote.relpath).write_text("x")
    assert set(fetch_all(tmp_path).values()) == {"present"}
    with pytest.raises(ValueError, match="unknown groups"):
        fetch_all(tmp_path, ("weights",))


@pytest.fixture
def fake_get(tmp_path, monkeypatch):
    """`_get` serving files from a local folder named by the URL's last part."""
    served = tmp_path / "served"
    served.mkdir()
    monkeypatch.setattr(download, "_get", lambda url, path: shutil.copyfile(served / url.rsplit("/", 1)[-1], path))
    return served


def _sha(data: bytes):
    return hashlib.sha256(data).hexdigest()


def test_zip_member_bz2_storage_and_copies(tmp_path, fake_get):
    with zipfile.ZipFile(fake_get / "bundle.zip", "w") as archive:
        archive.writestr("inner/test.raw", b"wiki text\n")
    (fake_get / "val.txt").write_bytes(b"hellaswag lines\n")
    root = tmp_path / "data"
    member = Remote("w/wiki.test.raw", "eval", "https://x/bundle.zip", _sha(b"wiki text\n"), member="inner/test.raw")
    packed = Remote("h/val.txt.bz2", "eval", "https://x/val.txt", _sha(b"hellaswag lines\n"))
    copy = Remote("w/cache/abc", "eval", "https://x/unused", _sha(b"wiki text\n"), copy_of="w/wiki.test.raw")
    assert fetch(member, root) == "fetched" and (root / "w/wiki.test.raw").read_bytes() == b"wiki text\n"
    assert fetch(packed, root) == "fetched" and bz2.decompress((root / "h/val.txt.bz2").read_bytes()) == b"hellaswag lines\n"
    assert fetch(copy, root) == "fetched" and (root / "w/cache/abc").read_bytes() == b"wiki text\n"
    assert fetch(member, root) == "present"
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["abc", "val.txt.bz2", "wiki.test.raw"]


def test_hash_mismatch_installs_nothing(tmp_path, fake_get):
    (fake_get / "file.jsonl").write_bytes(b"changed upstream")
    remote = Remote("lambada/file.jsonl", "eval", "https://x/file.jsonl", "0" * 64)
    with pytest.raises(ValueError, match="sha256 .* expected 0{64}: upstream changed"):
        fetch(remote, tmp_path)
    assert not any(p.is_file() for p in tmp_path.joinpath("lambada").rglob("*"))


def test_an_archive_is_fetched_once_for_all_its_members(tmp_path, fake_get, monkeypatch):
    with zipfile.ZipFile(fake_get / "ARC.zip", "w") as archive:
        archive.writestr("ARC/Easy.jsonl", b"easy\n")
        archive.writestr("ARC/Challenge.jsonl", b"challenge\n")
    fetched = []
    serve = download._get
    monkeypatch.setattr(download, "_get", lambda url, path: fetched.append(url) or serve(url, path))
    remotes = (Remote("arc_easy/e.jsonl", "eval", "https://x/ARC.zip", _sha(b"easy\n"), member="ARC/Easy.jsonl"),
               Remote("arc_challenge/c.jsonl", "eval", "https://x/ARC.zip", _sha(b"challenge\n"),
                      member="ARC/Challenge.jsonl"))
    monkeypatch.setattr(download, "FILES", remotes)
    results = fetch_all(tmp_path / "data", ("eval",))
    assert results == {"arc_easy/e.jsonl": "fetched", "arc_challenge/c.jsonl": "fetched"}
    assert fetched == ["https://x/ARC.zip"]
    assert (tmp_path / "data/arc_challenge/c.jsonl").read_bytes() == b"challenge\n"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["arc_challenge", "arc_easy"]  # archive gone


def test_pg19_books_come_from_the_published_list(tmp_path, fake_get, monkeypatch):
    (fake_get / "test_files.txt").write_text("test/10146.txt\ntest/10321.txt\n")
    (fake_get / "10146.txt").write_text("A book.")
    (fake_get / "10321.txt").write_text("Another book.")
    monkeypatch.setattr(download, "FILES", ())
    assert fetch_all(tmp_path, ("pg19",)) == {"pg19/test/10146.txt": "fetched", "pg19/test/10321.txt": "fetched"}
    assert (tmp_path / "pg19/test/10321.txt").read_text() == "Another book."
    assert download.pg19_remotes(tmp_path)[0].url == f"{download.PG19_BOOKS}/test/10146.txt"
    (fake_get / "test_files.txt").write_text("<html>not a list</html>")
    assert fetch_all(tmp_path / "other", ("pg19",))["pg19/test"].startswith("failed: ")
