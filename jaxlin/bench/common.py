"""What every benchmark shares: its command line (absl flags, one ``FlagValues`` per tool), the timer, and the
train-step report that ``train_step`` and ``reference`` print alike."""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
from absl import flags


def parse(flag_values: flags.FlagValues, argv: list[str] | None, doc: str) -> list[str]:
    """Parses ``argv`` (``sys.argv[1:]`` when None) into ``flag_values``, which start again from their
    defaults; ``--help`` prints ``doc`` and the flags. A bad flag exits with one line naming it. Returns
    the positional arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "-help") for a in argv):
        print(doc.strip() + "\n\nflags:\n" + flag_values.get_help())
        raise SystemExit(0)
    flag_values.unparse_flags()
    program, sys.argv = sys.argv, [sys.argv[0], *argv]  # ml_collections reads --config.x.y= from sys.argv
    try:
        return flag_values(sys.argv)[1:]
    except (flags.Error, ValueError, KeyError, AttributeError) as e:
        if isinstance(e.__cause__ or e.__context__, KeyError):  # a --config.KEY= override of no field
            key = str(e.__cause__ or e.__context__).strip("'\"")
            raise SystemExit(f"error: the config has no field '{key}'; check the --config.KEY= overrides") from None
        raise SystemExit(f"error: {e}") from None
    finally:
        sys.argv = program


def median_ms(fn, *args, warmup=3, queued=10, min_runs=10, max_runs=200, budget_s=3.0) -> float:
    """Median ms of a call, each sample the mean of ``queued`` calls dispatched back to back and waited
    for once, as a training loop runs them (and as ``triton.testing.do_bench`` times PyTorch): the device
    time, without the host's launch latency after each wait."""
    for _ in range(warmup):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
    if time.perf_counter() - start > 0.1:  # the last warm-up call says: a slow call, one per sample
        queued = 1
    times = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) * queued < budget_s):
        start = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(queued)])
        times.append((time.perf_counter() - start) / queued)
        if len(times) >= 3 and sum(times) * queued > 4 * budget_s:
            break
    return 1e3 * statistics.median(times)


# The train-step keys printed, in order, by jaxlin.bench.train_step and jaxlin.bench.reference alike.
REPORTED = ("device", "micro_batch", "seq_len", "sharded", "step_ms", "forward_ms", "backward_ms", "optimizer_ms",
            "tokens_per_s", "mfu", "peak_memory_gib")


def report(results: dict, json_path: str | None) -> None:
    """Prints the ``REPORTED`` keys that ``results`` has, one a line, and writes all of it to ``json_path``."""
    for key in REPORTED:
        value = results.get(key)
        if value is not None:
            print(f"{key:>16}: {value:,.2f}" if isinstance(value, float) else f"{key:>16}: {value}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)


def positive_ints(text: str, name: str) -> list[int]:
    """``"1024,2048"`` -> ``[1024, 2048]``; anything else stops the command with one line naming ``name``."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {name} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise SystemExit(f"error: {name} must be positive, got {text!r}")
    return values
