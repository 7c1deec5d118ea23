"""Fetches the public originals into a data directory, in the layout of shared/data.

    python -m jaxlin.data.download [--data_dir DIR] [--what tokenizer,eval,train,long,pg19]

Files already present are skipped. A download is checked against its sha256 (where one is known)
before it is moved into place, so a partial or changed file never lands. Each sha256 below is the one
shared/data/README.md records; pinning by hash lets branch URLs stay honest: if upstream changes,
the check fails loudly instead of silently fetching different data.
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import hashlib
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from jaxlin.data.paths import resolve_data_dir

GROUPS = ("tokenizer", "eval", "train", "long", "pg19")
DEFAULT_GROUPS = ("tokenizer", "eval", "train", "long")  # PG-19's test split (100 books) only when asked


@dataclasses.dataclass(frozen=True)
class Remote:
    """One file of the data directory and where it comes from.

    `member`: the file inside the zip archive at `url`. `copy_of`: a relpath fetched earlier whose bytes
    this file repeats. A relpath ending in .bz2 whose source does not is stored bz2-compressed.
    `sha256` is of the content as published (before any bz2 compression here)."""

    relpath: str
    group: str
    url: str
    sha256: str | None
    member: str | None = None
    copy_of: str | None = None


_OPENAI = "https://openaipublic.blob.core.windows.net"
_GH = "https://raw.githubusercontent.com"
# AI2's only official ARC release is one 680 MB zip (mostly the ARC corpus), fetched once per run.
_ARC_ZIP = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"
_SUPERGLUE = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2"
# Project Gutenberg texts with header and footer removed, as a public repository keeps them.
_BOOKS = f"{_GH}/Hweinstock/text-gen-Markov/3af86d829bb04ee7685dc8f0aa4678305ef6c807/data"
_TOKENIZER = (
    Remote("gpt2_tokenizer/vocab.bpe", "tokenizer", f"{_OPENAI}/gpt-2/encodings/main/vocab.bpe",
           "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    Remote("gpt2_tokenizer/encoder.json", "tokenizer", f"{_OPENAI}/gpt-2/encodings/main/encoder.json",
           "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    Remote("gpt2_tokenizer/r50k_base.tiktoken", "tokenizer", f"{_OPENAI}/encodings/r50k_base.tiktoken",
           "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
)
# tiktoken's own cache names a file sha1(URL): with TIKTOKEN_CACHE_DIR pointing here,
# tiktoken.get_encoding("gpt2") works offline.
_TIKTOKEN_CACHE = tuple(
    dataclasses.replace(r, relpath=f"gpt2_tokenizer/tiktoken_cache/{hashlib.sha1(r.url.encode()).hexdigest()}",
                        copy_of=r.relpath)
    for r in _TOKENIZER
)

FILES: tuple[Remote, ...] = _TOKENIZER + _TIKTOKEN_CACHE + (
    # WikiText-2 raw: Salesforce's original zip (s3.amazonaws.com/research.metamind.io/wikitext/...) is
    # gone; llama.cpp's CI keeps a copy on Hugging Face, pinned here to a commit.
    Remote("wikitext-2-raw/wiki.test.raw", "eval",
           "https://huggingface.co/datasets/ggml-org/ci/resolve/927b3642933080f1b0e811e2f916e14c292992f9/"
           "wikitext-2-raw-v1.zip",
           "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08", member="wikitext-2-raw/wiki.test.raw"),
    Remote("lambada/lambada_test.jsonl", "eval", f"{_OPENAI}/gpt-2/data/lambada_test.jsonl",
           "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"),
    Remote("arc_easy/ARC-Easy-Test.jsonl", "eval", _ARC_ZIP,
           "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
           member="ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl"),
    Remote("arc_challenge/ARC-Challenge-Test.jsonl", "eval", _ARC_ZIP,
           "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
           member="ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Test.jsonl"),
    # SuperGLUE's task zips (validation splits).
    Remote("boolq/val.jsonl", "eval", f"{_SUPERGLUE}/BoolQ.zip",
           "21acbfbd1e7908fddd9e626bc2a6101c5a5430bda3fbf74985b979af7a63b989", member="BoolQ/val.jsonl"),
    Remote("copa/val.jsonl", "eval", f"{_SUPERGLUE}/COPA.zip",
           "fa61467cc251010178ed72f8ca82a0fceefc4ca9a85f87ec3b6102955e1a1f1a", member="COPA/val.jsonl"),
    Remote("openbookqa/test.tsv", "eval",
           "https://ai2-public-datasets.s3.amazonaws.com/open-book-qa/OpenBookQA-V1-Sep2018.zip",
           "30b94f7cc2fa216455cc6e04bc4d5ef7d634eeb4f5c7b5f6b018914e78e0b0ff",
           member="OpenBookQA-V1-Sep2018/Data/Main/test.tsv"),
    Remote("piqa/valid.jsonl", "eval", f"{_GH}/ybisk/ybisk.github.io/master/piqa/data/valid.jsonl",
           "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d"),
    Remote("piqa/valid-labels.lst", "eval", f"{_GH}/ybisk/ybisk.github.io/master/piqa/data/valid-labels.lst",
           "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb"),
    # llama.cpp's preprocessed HellaSwag text (the format shared/data holds), stored bz2-compressed.
    Remote("hellaswag/hellaswag_val_full.txt.bz2", "eval", f"{_GH}/klosax/hellaswag_text_data/main/hellaswag_val_full.txt",
           "d572539320eb2050e858ca34b495bbe2103e3b3f1391a9c3bcdf215b0bb93bd1"),
    # The original HellaSwag validation set (absent from shared/data; hash from a Git-LFS pointer).
    Remote("hellaswag/hellaswag_val.jsonl", "eval", f"{_GH}/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
           "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"),
    # llm-foundry's WinoGrande dev in its schema format (snapshot commit 8c8dd48f; only the short hash is known).
    Remote("winogrande/winogrande_dev_llmfoundry.jsonl", "eval",
           f"{_GH}/mosaicml/llm-foundry/main/scripts/eval/local_data/language_understanding/winogrande.jsonl",
           "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7"),
    Remote("winogrande/dev-labels.lst", "eval",
           "https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip",
           "5ae1e30f52a50b880515685dcfae7d57649cce256d375947cdd02f687de7e6ba", member="winogrande_1.1/dev-labels.lst"),
    # The original dev set (absent from shared/data; hash from a Git-LFS pointer).
    Remote("winogrande/dev.jsonl", "eval",
           "https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip",
           "1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8", member="winogrande_1.1/dev.jsonl"),
    Remote("train_corpus/tinyshakespeare_input.txt", "train",
           f"{_GH}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
           "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    Remote("train_corpus/nltk_movie_reviews.zip", "train",
           f"{_GH}/nltk/nltk_data/5db857e6f7df11eabb5e5665836db9ec8df07e28/packages/corpora/movie_reviews.zip",
           "a41211ae685019137410268134db6a1a14428c89b671eb83056151a878539008"),
    Remote("train_corpus/fineweb_edu_sample10BT_150docs_annotated.csv", "train",
           f"{_GH}/Mohamed-Elsafty23/fineweb-edu-scorer/ab8fb571500aa54f6aad0302dd8b4ba002cd9bc2/data/training_data.csv",
           "861c28ef6a42f9a6f2e246d7dba4e56bd3f0fab67fed89bc7db4bf883e7c0b42"),
    # First parquet file of FineWeb-Edu sample-10BT (about 2 GB, ~1M documents); no published hash.
    Remote("train_corpus/fineweb_edu_sample10BT_000_00000.parquet", "train",
           "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/000_00000.parquet", None),
    # train_corpus_extra/ has no public URL: it was assembled from many repositories (see shared/data/README.md).
    # Two long public-domain novels for loss by position (eval.py --tasks long_ppl).
    Remote("long_books/melville_moby_dick.txt", "long", f"{_BOOKS}/moby_dick.txt",
           "e2770643f8c430374add223d6674311f744fcfbbbb54080aa7b7de3290e2c8f8"),
    Remote("long_books/austen_pride_and_prejudice.txt", "long", f"{_BOOKS}/pride_and_prejudice.txt",
           "a89b8988e254cca9674a5ac810aa798694f3144918b650db5c24fde1e3c24d45"),
)

# PG-19 (Rae et al. 2019): DeepMind's public bucket holds one .txt per book; the Hugging Face dataset lists
# each split's paths. The test split (100 books) lands in pg19/test/, for eval.py --long_docs DATA_DIR/pg19/test.
PG19_FILE_LIST = "https://huggingface.co/datasets/deepmind/pg19/resolve/main/data/test_files.txt"
PG19_BOOKS = "https://storage.googleapis.com/deepmind-gutenberg"


def fetch(remote: Remote, data_dir: Path, archives: Path | None = None) -> str:
    """Puts one file in place; returns 'present' or 'fetched'. A zip archive fetched is kept in the
    folder `archives`, when given, for the next files from the same archive."""
    target = data_dir / remote.relpath
    if target.exists():
        return "present"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        if remote.copy_of:
            content = data_dir / remote.copy_of
            if not content.exists():
                raise FileNotFoundError(f"it copies {remote.copy_of}, which is missing (its fetch failed)")
        elif archives is not None and (kept := archives / hashlib.sha1(remote.url.encode()).hexdigest()).exists():
            content = kept
        else:
            content = _get(remote.url, Path(tmp) / "download")
            if archives is not None and remote.member:
                content = Path(shutil.move(content, kept))
        if remote.member:
            with zipfile.ZipFile(content) as archive:
                content = Path(archive.extract(remote.member, tmp))
        if remote.sha256 and (digest := _sha256(content)) != remote.sha256:
            raise ValueError(f"{remote.url}{' ' + remote.member if remote.member else ''} has sha256 {digest}, "
                             f"expected {remote.sha256}: upstream changed; not installing {remote.relpath}")
        ready = Path(tmp) / "ready"
        source_name = remote.member or remote.url
        if remote.relpath.endswith(".bz2") and not source_name.endswith(".bz2"):
            with open(content, "rb") as src, bz2.open(ready, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            shutil.copyfile(content, ready)
        ready.replace(target)
    return "fetched"


def fetch_all(data_dir=None, groups=DEFAULT_GROUPS) -> dict[str, str]:
    """relpath -> 'present' | 'fetched' | 'failed: why', for every file of the chosen groups."""
    root = resolve_data_dir(data_dir)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown groups {sorted(unknown)}; choose from {GROUPS}")
    results = {}
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".archives-") as archives:
        remotes = [r for r in FILES if r.group in groups]
        if "pg19" in groups:
            try:
                remotes += pg19_remotes(Path(archives))
            except (OSError, ValueError) as error:
                results["pg19/test"] = f"failed: {error}"
                print(f"pg19/test: {results['pg19/test']}", flush=True)
        for remote in remotes:
            try:
                results[remote.relpath] = fetch(remote, root, Path(archives))
            except (OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
                results[remote.relpath] = f"failed: {error}"
            print(f"{remote.relpath}: {results[remote.relpath]}", flush=True)
    return results


def pg19_remotes(scratch: Path) -> list[Remote]:
    """One Remote per book of PG-19's test split, from the published list of its paths (no hashes exist)."""
    listing = _get(PG19_FILE_LIST, scratch / "pg19_test_files.txt").read_text().split()
    books = [p if "/" in p else f"test/{p}" for p in listing]
    if not books or not all(p.startswith("test/") and p.endswith(".txt") for p in books):
        raise ValueError(f"{PG19_FILE_LIST} does not list test/<id>.txt paths: {listing[:3]}")
    return [Remote(f"pg19/{p}", "pg19", f"{PG19_BOOKS}/{p}", None) for p in books]


def _get(url: str, path: Path) -> Path:
    request = urllib.request.Request(url, headers={"User-Agent": "jaxlin-data-download"})
    with urllib.request.urlopen(request, timeout=60) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], leave=False) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="target folder (default: $JAXLIN_DATA_DIR, ../shared/data, user cache)")
    parser.add_argument("--what", default=",".join(DEFAULT_GROUPS),
                        help=f"comma-separated groups from {','.join(GROUPS)} (default %(default)s; train includes a "
                             "~2 GB FineWeb-Edu parquet, for ARC eval downloads a 680 MB zip once, long is two "
                             "novels, pg19 PG-19's 100 test books)")
    args = parser.parse_args(argv)
    results = fetch_all(args.data_dir, tuple(g for g in args.what.split(",") if g))
    failed = [path for path, status in results.items() if status.startswith("failed")]
    if failed:
        sys.exit(f"{len(failed)} file(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
