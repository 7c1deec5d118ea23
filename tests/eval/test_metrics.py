"""Standard errors as lm-evaluation-harness reports them."""

import math

import pytest

from jaxlin.eval.metrics import accuracy, mean_stderr


def test_mean_stderr_is_the_sample_standard_error():
    values = [1, 0, 1, 1, 0, 1, 1]
    n, mean = len(values), sum(values) / len(values)
    sample_variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    assert mean_stderr(values) == pytest.approx(math.sqrt(sample_variance / n), rel=1e-12)
    # For 0/1 outcomes that is sqrt(p (1 - p) / (n - 1)).
    assert mean_stderr(values) == pytest.approx(math.sqrt(mean * (1 - mean) / (n - 1)), rel=1e-12)
    assert mean_stderr([2.0, 4.0, 9.0]) == pytest.approx(math.sqrt(13 / 3), rel=1e-12)  # variance 13, n 3
    assert mean_stderr([1]) is None and mean_stderr([]) is None


def test_accuracy_reports_mean_and_stderr():
    got = accuracy("acc_norm", [True, False, True, True])
    assert got == {"acc_norm": 0.75, "acc_norm_stderr": pytest.approx(math.sqrt(0.75 * 0.25 / 3))}
