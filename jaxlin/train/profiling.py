"""Where a step's device time goes: trace a few steps with `jax.profiler` and sum the kernels.

The trace is the profiler's `*.trace.json.gz` (Chrome trace format, written without extra
packages); device kernels are the complete events of the `/device:...` processes.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

import jax

# First match wins; names are CUDA kernel names as XLA and Pallas emit them.
CATEGORIES = (
    ("matmul", re.compile(r"gemm|nvjet|cutlass|cublas|xmma|sm90_|wgmma", re.I)),
    ("pallas", re.compile(r"^(gla|delta)_")),
    ("collective", re.compile(r"nccl|all_reduce|all_gather|reduce_scatter", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_|triton", re.I)),
)


def category(name: str) -> str:
    return next((label for label, pattern in CATEGORIES if pattern.search(name)), "other")


def trace_steps(fn, *args, steps: int, log_dir: str) -> pathlib.Path:
    """Runs `fn(*args)` `steps` times under the profiler; returns the trace file."""
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(log_dir):
        for _ in range(steps):
            jax.block_until_ready(fn(*args))
    return max(pathlib.Path(log_dir).glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)


def device_kernel_times(trace_file: pathlib.Path, steps: int, device_prefix: str = "/device:") -> dict:
    """`{"kernels": [(name, category, ms per step, calls per step)], "categories": {category: ms per
    step}, "total_ms": ms per step}`, kernels sorted by time."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)["traceEvents"]
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and e["args"]["name"].startswith(device_prefix)}
    time_us, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["pid"] in devices:
            time_us[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    kernels = [(name, category(name), us / 1e3 / steps, calls[name] / steps) for name, us in time_us.most_common()]
    by_category = collections.Counter()
    for _, label, ms, _ in kernels:
        by_category[label] += ms
    return {"kernels": kernels, "categories": dict(by_category.most_common()),
            "total_ms": sum(ms for _, _, ms, _ in kernels)}


def format_table(times: dict, top: int = 40) -> str:
    lines = [f"device time per step: {times['total_ms']:.2f} ms (kernels summed; overlap counts twice)"]
    lines += [f"  {label:<11} {ms:9.2f} ms" for label, ms in times["categories"].items()]
    lines.append(f"{'ms/step':>9} {'calls':>6}  {'category':<11} kernel")
    lines += [f"{ms:9.3f} {n:6.1f}  {label:<11} {name[:110]}" for name, label, ms, n in times["kernels"][:top]]
    return "\n".join(lines)
