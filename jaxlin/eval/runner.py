"""Evaluate an exported model on a list of tasks: print a table and optionally write JSON."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from jaxlin import export
from jaxlin.data.tokenizer import get_tokenizer
from jaxlin.eval.scoring import Scorer
from jaxlin.eval.tasks import TASKS, task_files

DEFAULT_TASKS = tuple(TASKS)


def run(model_dir: str | os.PathLike, tasks=DEFAULT_TASKS, limit: int | None = None,
        output: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
        batch_size: int = 32, seq_len: int | None = None, dtype: str | None = None,
        progress: bool = True) -> dict:
    """Returns {task: {metric: value, ..., "samples": n}} for the export in `model_dir`.

    `limit` keeps the first N documents of each task; `seq_len` is the context length (default the
    model's block_size); `dtype` overrides the compute dtype ("float32" / "bfloat16").
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    files = {name: task_files(name, data_dir) for name in tasks}  # fail on missing data before loading
    model, _ = export.load(model_dir, dtype=dtype)
    scorer = Scorer(model, max_len=seq_len, batch_size=batch_size, progress=progress)
    tokenizer = get_tokenizer(data_dir)
    results = {}
    for name in tasks:
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        results[name] = TASKS[name].evaluate(scorer, tokenizer, files[name], limit)
        print(f"{name} done in {time.perf_counter() - start:.1f}s", flush=True)
    print(format_table(results))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    lines = [f"{'task':<12} {'metric':<18} {'value':>12} {'samples':>8}"]
    for name, metrics in results.items():
        for metric, value in metrics.items():
            if metric != "samples":
                shown = f"{value:>12.4f}" if isinstance(value, float) else f"{value:>12}"
                lines.append(f"{name:<12} {metric:<18} {shown} {metrics['samples']:>8}")
    return "\n".join(lines)
