"""Aggregate metrics with the standard errors lm-evaluation-harness reports."""

from __future__ import annotations

import math

import numpy as np


def mean_stderr(values) -> float | None:
    """Standard error of the mean, sqrt(sample variance / n) with the n - 1 (ddof=1) variance, as the
    harness's `mean_stderr` reports for acc and acc_norm; None for fewer than two values."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return None
    return math.sqrt(values.var(ddof=1) / values.size)


def accuracy(name: str, correct) -> dict:
    """{name: mean of the 0/1 outcomes, name_stderr: its standard error}."""
    correct = np.asarray(correct, np.float64)
    return {name: float(correct.mean()), f"{name}_stderr": mean_stderr(correct)}
