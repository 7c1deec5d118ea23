import pytest

from jaxlin.data.paths import FETCH_COMMAND, MissingDataError, require
from jaxlin.data.prepare import prepare_corpus
from jaxlin.data.tokenizer import get_tokenizer


def test_missing_file_names_file_folder_and_fetch_command(tmp_path):
    with pytest.raises(MissingDataError) as error:
        require(tmp_path, "lambada/lambada_test.jsonl")
    message = str(error.value)
    assert "lambada/lambada_test.jsonl" in message
    assert str(tmp_path) in message
    assert FETCH_COMMAND in message and "python -m jaxlin.data.download" in message


def test_missing_tokenizer_and_source_raise_the_same_error(tmp_path):
    with pytest.raises(MissingDataError, match="gpt2_tokenizer/vocab.bpe"):
        get_tokenizer(tmp_path)
    with pytest.raises(MissingDataError, match="train_corpus/nothing.txt"):
        prepare_corpus(["train_corpus/nothing.txt"], tmp_path / "out", data_dir=tmp_path)
