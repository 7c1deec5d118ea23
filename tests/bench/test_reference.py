"""The PyTorch reference runner's command line, where PyTorch and FLA are absent (they are not dependencies)."""

import sys

import pytest

from jaxlin.bench import reference


def test_help_needs_neither_torch_nor_fla(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit) as exit:
        reference.main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "--micro_batch" in out and "GatedLinearAttention" in out


def test_without_torch_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(SystemExit, match="needs PyTorch and FLA .*pip install torch flash-linear-attention"):
        reference.main(["--steps", "1"])
