import pytest

from jaxlin.data.paths import MissingDataError, require, resolve_data_dir


@pytest.fixture(scope="session")
def data_dir():
    """The real data directory ($JAXLIN_DATA_DIR or ../shared/data); tests needing it skip without it."""
    root = resolve_data_dir(None)
    try:
        require(root, "gpt2_tokenizer/vocab.bpe")
    except MissingDataError as error:
        pytest.skip(str(error))
    return root
