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
from typing import Callable

import jax

# First match wins; names are CUDA kernel names as XLA and Pallas emit them.
CATEGORIES = (
    ("matmul", re.compile(r"gemm|nvjet|cutlass|cublas|xmma|sm90_|wgmma", re.I)),
    ("pallas", re.compile(r"^(gla|delta|gelu)_")),
    ("collective", re.compile(r"nccl|all_reduce|all_gather|reduce_scatter", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_|triton", re.I)),
)


def category(name: str) -> str:
    return next((label for label, pattern in CATEGORIES if pattern.search(name)), "other")


def trace(run: Callable[[], object], log_dir: str) -> pathlib.Path:
    """Runs `run()` (already compiled and warm) under the profiler; returns the trace file."""
    with jax.profiler.trace(log_dir):
        jax.block_until_ready(run())
    return max(pathlib.Path(log_dir).glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)


def device_kernel_times(trace_file: pathlib.Path, steps: int, device_prefix: str = "/device:") -> dict:
    """`{"kernels": [(name, category, ms per step, calls per step)], "categories": {category: ms per
    step}, "total_ms": ms per step, "idle_ms": ms per step, "idle_after": [(name, ms per step, gaps per
    step)]}`, kernels sorted by time. Idle is device time with no kernel running; it is charged to the
    kernel that ran last before the gap, since a gap after it is usually the host launching what follows."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)["traceEvents"]
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and e["args"]["name"].startswith(device_prefix)}
    kernel_events = [e for e in events if e.get("ph") == "X" and e["pid"] in devices]
    time_us, calls = collections.Counter(), collections.Counter()
    for e in kernel_events:
        time_us[e["name"]] += e.get("dur", 0)
        calls[e["name"]] += 1
    idle_us, gaps = idle_after(kernel_events)
    kernels = [(name, category(name), us / 1e3 / steps, calls[name] / steps) for name, us in time_us.most_common()]
    by_category = collections.Counter()
    for _, label, ms, _ in kernels:
        by_category[label] += ms
    return {"kernels": kernels, "categories": dict(by_category.most_common()),
            "total_ms": sum(ms for _, _, ms, _ in kernels),
            "idle_ms": sum(idle_us.values()) / 1e3 / steps,
            "idle_after": [(name, us / 1e3 / steps, gaps[name] / steps) for name, us in idle_us.most_common()]}


def idle_after(kernel_events: list[dict]) -> tuple[collections.Counter, collections.Counter]:
    """Per device, the gaps in which no kernel on any stream runs, summed (µs) and counted by the name
    of the kernel that finished last before each gap."""
    idle_us, gaps = collections.Counter(), collections.Counter()
    by_device = collections.defaultdict(list)
    for e in kernel_events:
        by_device[e["pid"]].append(e)
    for device_events in by_device.values():
        device_events.sort(key=lambda e: e["ts"])
        busy_until, last = None, None
        for e in device_events:
            end = e["ts"] + e.get("dur", 0)
            if busy_until is not None and e["ts"] > busy_until:
                idle_us[last] += e["ts"] - busy_until
                gaps[last] += 1
            if busy_until is None or end >= busy_until:
                busy_until, last = end, e["name"]
    return idle_us, gaps


def format_table(times: dict, top: int = 40) -> str:
    lines = [f"device time per step: {times['total_ms']:.2f} ms (kernels summed; overlap counts twice)"]
    lines += [f"  {label:<11} {ms:9.2f} ms" for label, ms in times["categories"].items()]
    lines.append(f"  {'idle':<11} {times['idle_ms']:9.2f} ms (no kernel running; inside and between steps)")
    lines.append(f"{'idle ms':>9} {'gaps':>6}  after kernel")
    lines += [f"{ms:9.3f} {n:6.1f}  {name[:110]}" for name, ms, n in times["idle_after"][:10]]
    lines.append(f"{'ms/step':>9} {'calls':>6}  {'category':<11} kernel")
    lines += [f"{ms:9.3f} {n:6.1f}  {label:<11} {name[:110]}" for name, label, ms, n in times["kernels"][:top]]
    return "\n".join(lines)
