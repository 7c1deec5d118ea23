"""Evaluate an exported model on a list of tasks: print one table and optionally write it to JSON with
what was scored (the export's path, config hash and parameter count) and by which evaluator."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import subprocess
import time
import tomllib
from pathlib import Path

from jaxlin import export
from jaxlin.data.paths import REPO_ROOT, resolve_data_dir
from jaxlin.data.tokenizer import get_tokenizer
from jaxlin.eval import long_ppl
from jaxlin.eval.scoring import Scorer
from jaxlin.eval.tasks import STANDARD_TASKS, TASKS, task_files
from jaxlin.model import count_params

DEFAULT_TASKS = STANDARD_TASKS
# The metric the papers' column shows comes first; the rest follow in the task's own order.
HEADLINE = {"wikitext2": "word_perplexity", "hellaswag": "acc_norm", "arc_challenge": "acc_norm"}
# What each metric averages over (the table's n column); accuracies count samples.
COUNTS = {"token_perplexity": "tokens", "word_perplexity": "words", "byte_perplexity": "bytes",
          "bits_per_byte": "bytes", "perplexity": "tokens", "loss": "tokens"}
_NOT_METRICS = {"samples", "tokens", "words", "bytes"}


def run(model_dir: str | os.PathLike, tasks=DEFAULT_TASKS, limit: int | None = None,
        output: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
        batch_size: int = 32, seq_len: int | None = None, dtype: str | None = None,
        progress: bool = True, long_ppl_len: int = long_ppl.DEFAULT_WINDOW,
        long_docs: str | os.PathLike | None = None, plot: str | os.PathLike | None = None) -> dict:
    """Returns {task: {metric: value, metric_stderr: ..., ..., "samples": n}} for the export in `model_dir`.

    `limit` keeps the first N documents of each task; `seq_len` is the context length (default the
    model's block_size); `dtype` overrides the compute dtype ("float32" / "bfloat16"). long_ppl scores
    the .txt files of `long_docs` (default the data directory's long_books/) in windows of `long_ppl_len`
    tokens and plots loss by position to `plot` (default: beside `output`).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    files = {name: task_files(name, data_dir) for name in tasks if not (name == "long_ppl" and long_docs)}
    if "long_ppl" in tasks:  # fail on missing data before loading
        files["long_ppl"] = [Path(long_docs) if long_docs else files["long_ppl"][0]]
        long_ppl.list_documents(files["long_ppl"][0])
    options = {"long_ppl": {"window": long_ppl_len}}
    model, config = export.load(model_dir, dtype=dtype)
    scorer = Scorer(model, max_len=seq_len, batch_size=batch_size, progress=progress)
    tokenizer = get_tokenizer(data_dir)
    results = {}
    for name in tasks:
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        results[name] = TASKS[name].evaluate(scorer, tokenizer, files[name], limit, **options.get(name, {}))
        print(f"{name} done in {time.perf_counter() - start:.1f}s", flush=True)
    results = {name: results[name] for name in TASKS if name in results}  # the papers' order
    rows = table_rows(results)
    print(format_table(rows))
    if "long_ppl" in results and results["long_ppl"].get("note"):
        print(f"long_ppl: {results['long_ppl']['note']}")
    if output is not None:
        report = {
            "model": {"path": str(Path(model_dir).resolve()), "config_sha256": _sha256(Path(model_dir) / export.CONFIG),
                      "parameters": count_params(model), "config": config.to_dict()},
            "evaluator": evaluator_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {"tasks": list(tasks), "limit": limit, "seq_len": scorer.max_len, "dtype": config.dtype,
                         "batch_size": batch_size, "data_dir": str(resolve_data_dir(data_dir)),
                         **({"long_ppl_len": long_ppl_len, "long_docs": str(files["long_ppl"][0].resolve())}
                            if "long_ppl" in tasks else {})},
            "table": rows,
            "results": results,
        }
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
    if "long_ppl" in results and (plot or output):
        _plot(results["long_ppl"], Path(plot) if plot else Path(output).with_suffix(".long_ppl.png"), model_dir)
    return results


def _plot(result: dict, path: Path, model_dir) -> None:
    try:
        from jaxlin.eval.plot_long_ppl import plot_long_ppl  # matplotlib only when a plot is asked for

        plot_long_ppl({Path(model_dir).resolve().parent.name or "model": result}, path)
        print(f"loss by position plotted to {path}")
    except ImportError as error:  # the numbers are printed and written already
        print(f"no plot ({error}); install matplotlib and run python -m jaxlin.eval.plot_long_ppl")


def table_rows(results: dict) -> list[dict]:
    """One row per metric: task, metric, value, stderr (None where the harness gives none), n and what
    n counts; tasks in the papers' column order, each with its headline metric first."""
    rows = []
    for name, metrics in results.items():
        if name == "long_ppl":
            rows.append(_row(name, f"loss (window {metrics['window']})", metrics["loss"], None, metrics["tokens"],
                             "tokens"))
            rows += [_row(name, f"loss {b['positions']}", b["loss"], None, b["tokens"], "tokens")
                     for b in metrics["buckets"]]
            continue
        names = [m for m, v in metrics.items()
                 if m not in _NOT_METRICS and not m.endswith("_stderr") and isinstance(v, (int, float))]
        names.sort(key=lambda m: m != HEADLINE.get(name))
        for metric in names:
            counted = COUNTS.get(metric, "samples")
            rows.append(_row(name, metric, metrics[metric], metrics.get(f"{metric}_stderr"), metrics[counted],
                             counted))
    return rows


def _row(task, metric, value, stderr, n, counted) -> dict:
    return {"task": task, "metric": metric, "value": value, "stderr": stderr, "n": n, "counts": counted}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'task':<14} {'metric':<22} {'value':>12} {'± stderr':>10} {'n':>9} {'of':<7}"]
    for row in rows:
        stderr = "" if row["stderr"] is None else f"{row['stderr']:.4f}"
        lines.append(f"{row['task']:<14} {row['metric']:<22} {row['value']:>12.4f} {stderr:>10} {row['n']:>9} "
                     f"{row['counts']:<7}")
    return "\n".join(lines)


def evaluator_version() -> dict:
    """jaxlin's version and, when run from a git checkout, its commit and whether files differ from it."""
    try:
        version = importlib.metadata.version("jaxlin")
    except importlib.metadata.PackageNotFoundError:
        version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    info = {"version": version, "commit": None, "dirty": None}
    try:
        git = lambda *args: subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                                           check=True, timeout=10).stdout.strip()
        info["commit"] = git("rev-parse", "HEAD")
        info["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout, or no git: the version alone
    return info


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
