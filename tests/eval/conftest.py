"""Fixtures of the eval tests; the helpers live in eval_helpers.py."""

import pytest

from jaxlin.data.paths import resolve_data_dir
from tests.eval.eval_helpers import tiny_model


@pytest.fixture(scope="session")
def gla():
    return tiny_model("gla")


@pytest.fixture(scope="session")
def data_dir():
    root = resolve_data_dir(None)
    if not (root / "wikitext-2-raw" / "wiki.test.raw").exists():
        pytest.skip(f"evaluation data not found in {root} (python -m jaxlin.data.download)")
    return root
