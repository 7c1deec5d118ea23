"""The Mosaic GPU building blocks that need no kernel to test."""

import pytest

from kernels.mosaic import named_refs


def test_named_refs_puts_none_where_an_optional_ref_was_not_passed():
    assert named_refs(("q", "k", "o"), "q seg k o", seg=False) == ("q", None, "k", "o")
    assert named_refs(("q", "s", "k", "o"), "q seg k o", seg=True) == ("q", "s", "k", "o")
    with pytest.raises(ValueError, match="3 refs for the 4 names"):
        named_refs(("q", "k", "o"), "q seg k o")
    with pytest.raises(ValueError, match="'h0'"):
        named_refs(("q", "k", "o"), "q k o", h0=False)
