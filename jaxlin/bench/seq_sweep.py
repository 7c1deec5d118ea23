"""The train step against sequence length, at a fixed number of tokens per micro-batch.

    python -m jaxlin.bench.seq_sweep [--configs gla,softmax] [--lengths 1024,2048,4096,8192,16384]
        [--tokens 32768] [--steps 5] [--budget 540] [--json seq_sweep.json]

For each config and length T it times the full train step (forward, backward, clipping, AdamW) on random
tokens at micro-batch tokens // T: T = 1k..16k at micro-batch 32..2 by default. A config is a file in
configs/ named gpt2_medium_NAME.py or NAME.py, or a path. Learned position embeddings are grown to T
(block_size), so the softmax model runs at every length. Each row runs in its own process under
--row_timeout, so a row that runs out of memory or time is reported as such and the sweep goes on. Rows
run length by length (every config at T before the next T); those still to run when --budget seconds
have passed are skipped and listed, to run later with --configs/--lengths. The table gives tokens/s,
MFU (the analytic FLOPs of jaxlin.train.flops: softmax layers' q k^T and p v are counted over the whole
T x T square), peak memory and tokens/s relative to the config's shortest length, then where each config
overtakes the softmax config: the shortest T from which it is faster at every longer length measured.

A row costs a process start, a compile and steps + 2 steps (tens of seconds for GPT-2 Medium on an
H100), so the default pair (gla, softmax: 10 rows) takes a few minutes; the other GPT-2 Medium configs
are a second run: --configs gated_deltanet,hybrid.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import runpy
import subprocess
import sys
import tempfile
import time

from jaxlin.bench.common import positive_ints

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIGS = "gla,softmax"
DEFAULT_LENGTHS = "1024,2048,4096,8192,16384"
MIN_ROW_S = 30  # a row needs at least this long (process start and compile)


def time_train_step(config, steps: int) -> dict:
    """The train-step benchmark that every row runs (one micro-batch, chained donated steps)."""
    from jaxlin.bench.train_step import bench
    return bench(config, steps, sharded=False, phases=False)


def config_path(name: str) -> pathlib.Path:
    for path in (pathlib.Path(name), REPO / "configs" / f"gpt2_medium_{name}.py", REPO / "configs" / f"{name}.py"):
        if path.suffix == ".py" and path.is_file():
            return path
    raise SystemExit(f"error: no config {name!r}: expected configs/gpt2_medium_{name}.py, configs/{name}.py or a "
                     "path to a config file")


def row_config(path: pathlib.Path, seq_len: int, micro_batch: int):
    """The config at ``path`` with T = seq_len, one micro-batch of ``micro_batch`` per step, and learned
    positions (if any) covering T."""
    config = runpy.run_path(str(path))["get_config"]()
    config.data.seq_len = seq_len
    config.train.update(micro_batch_size=micro_batch, batch_size=micro_batch)
    config.model.block_size = max(config.model.block_size, seq_len)
    return config


def run_row(path: pathlib.Path, seq_len: int, micro_batch: int, steps: int, out: str) -> None:
    """In the row's own process: time the step and write the results to ``out``."""
    from jaxlin.train.config import apply_xla_flags
    config = row_config(path, seq_len, micro_batch)
    apply_xla_flags(config)  # before anything starts a backend
    results = time_train_step(config, steps)
    pathlib.Path(out).write_text(json.dumps(results))


def failure(output: str) -> str:
    """A short reason from a failed row's output."""
    if "RESOURCE_EXHAUSTED" in output or "out of memory" in output.lower():
        return "out of memory"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "failed"


def spawn_row(path: pathlib.Path, seq_len: int, micro_batch: int, steps: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        command = [sys.executable, "-m", "jaxlin.bench.seq_sweep", "--row", str(path), "--lengths", str(seq_len),
                   "--micro_batch", str(micro_batch), "--steps", str(steps), "--json", out]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"timeout after {timeout:.0f} s"}
        wall = time.perf_counter() - start
        if done.returncode or not os.path.exists(out):
            return {"status": failure(done.stdout + done.stderr), "wall_s": wall}
        return {"status": "ok", "wall_s": wall, **json.loads(pathlib.Path(out).read_text())}


def crossover(rows: list[dict], challenger: str, baseline: str) -> dict:
    """Where ``challenger`` overtakes ``baseline`` in tokens/s: the shortest T from which it is faster at every
    longer T that both measured. ``{"from_len": T or None, "lengths": [T, ...]}``; None when it is not
    ahead at the longest such T."""
    speed = {(r["name"], r["seq_len"]): r["tokens_per_s"] for r in rows if r.get("status") == "ok"}
    lengths = sorted(T for name, T in speed if name == challenger and (baseline, T) in speed)
    from_len = None
    for T in reversed(lengths):
        if speed[challenger, T] <= speed[baseline, T]:
            break
        from_len = T
    return {"from_len": from_len, "lengths": lengths}


def format_table(rows: list[dict]) -> str:
    header = (f"{'config':<16}{'T':>7}{'batch':>7}{'step ms':>10}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}"
              f"{'vs short':>10}")
    lines = [header, "-" * len(header)]
    shortest = {}
    for r in rows:
        prefix = f"{r['name']:<16}{r['seq_len']:>7}{r['micro_batch']:>7}"
        if r["status"] != "ok":
            lines.append(f"{prefix}  {r['status']}")
            continue
        base = shortest.setdefault(r["name"], r["tokens_per_s"])
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"{prefix}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11,.0f}{mfu:>7}{r['peak_memory_gib']:>10.2f}"
                     f"{r['tokens_per_s'] / base:>10.2f}")
    return "\n".join(lines)


def format_crossovers(crossovers: dict) -> list[str]:
    lines = []
    for (name, baseline), c in crossovers.items():
        if not c["lengths"]:
            lines.append(f"{name} vs {baseline}: no length measured for both")
        elif c["from_len"] is None:
            lines.append(f"{name} vs {baseline}: {baseline} is faster at T = {c['lengths'][-1]}, the longest measured")
        elif c["from_len"] == c["lengths"][0]:
            lines.append(f"{name} vs {baseline}: {name} is faster at every length measured (from T = {c['from_len']})")
        else:
            lines.append(f"{name} vs {baseline}: {name} overtakes {baseline} from T = {c['from_len']}")
    return lines


def sweep(names: list[str], lengths: list[int], tokens: int, steps: int, row_timeout: float, budget: float,
          json_path: str | None) -> dict:
    paths = {name: config_path(name) for name in names}
    started, rows = time.perf_counter(), []
    record = {"tokens_per_micro_batch": tokens, "steps": steps, "rows": rows}
    for T in lengths:  # every config at one length before the next: a budget cut leaves comparable pairs
        for name in names:
            row = {"name": name, "config_file": str(paths[name]), "seq_len": T, "micro_batch": tokens // T}
            left = budget - (time.perf_counter() - started)
            if left < MIN_ROW_S:
                row["status"] = f"skipped: the {budget:.0f} s budget was spent"
            else:
                row.update(spawn_row(paths[name], T, tokens // T, steps, min(row_timeout, left)))
            rows.append(row)
            shown = (f"{row['tokens_per_s']:,.0f} tokens/s, {row['peak_memory_gib']:.1f} GiB"
                     if row["status"] == "ok" else row["status"])
            print(f"{name} T={T} B={tokens // T}: {shown}", flush=True)
            if json_path:  # after every row: a sweep cut short keeps what it measured
                pathlib.Path(json_path).write_text(json.dumps(record, indent=1))
    rows.sort(key=lambda r: names.index(r["name"]))  # stable: by config, then length
    baselines = [n for n in names if "softmax" in n]
    record["crossover"] = {(n, b): crossover(rows, n, b) for b in baselines for n in names if n not in baselines}
    print()
    print(format_table(rows))
    for line in format_crossovers(record["crossover"]):
        print(line)
    record["crossover"] = [{"config": n, "baseline": b, **c} for (n, b), c in record["crossover"].items()]
    device = next((r["device"] for r in rows if r.get("device")), None)
    record["device"] = device
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(record, indent=1))
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated config names or paths")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated sequence lengths")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per micro-batch (a multiple of each T)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after 2 warm-up steps)")
    parser.add_argument("--row_timeout", type=float, default=240, help="seconds a row may take, compile included")
    parser.add_argument("--budget", type=float, default=540, help="seconds after which remaining rows are skipped")
    parser.add_argument("--json", help="write the rows, crossovers and device here")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # the config file of one row, run in this process
    parser.add_argument("--micro_batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lengths = positive_ints(args.lengths, "--lengths")
    if args.row:
        return run_row(pathlib.Path(args.row), lengths[0], args.micro_batch, args.steps, args.json)
    uneven = [T for T in lengths if args.tokens % T]
    if uneven:
        raise SystemExit(f"error: --tokens {args.tokens} is not a multiple of T = {uneven}; every row has "
                         "tokens // T sequences of T tokens")
    sweep(args.configs.split(","), lengths, args.tokens, args.steps, args.row_timeout, args.budget, args.json)


if __name__ == "__main__":
    main()
