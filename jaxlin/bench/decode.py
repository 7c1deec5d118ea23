"""Decode benchmark: GPT-2 Medium (random weights) generating from a fixed-size state or a KV cache.

    python -m jaxlin.bench.decode [--models gla,gated_deltanet,softmax] [--batch 1,8,64]
        [--context 1024,4096,16384,32768] [--new_tokens 32] [--repeats 3] [--bandwidth B]
        [--time_budget 400] [--naive_check 1024] [--decode_only] [--impl reference] [--mlp_impl xla]
        [--exhaustive_autotune] [--json decode.json] [--profile DIR] [--tiny]

Per (model, batch, context): random prompts are prefilled (chunks of --prefill_chunk tokens per row, one
jitted call each), then greedy tokens are decoded in jitted blocks of --new_tokens steps: a warm-up block,
then --repeats timed ones (the median counts), as `Generator` decodes (a recurrent model's lone row beside a
stopped copy). Reported: prefill tokens/s; decode ms per step and tokens/s (batch x steps / time); the
memory of the per-layer state (recurrent state + short-conv inputs, or the KV cache);
the physical bound of a decode
step, the bytes it must move at --bandwidth (every weight once in the compute dtype, the recurrent state
read and written, or the KV cache up to the context read) and the measured step's share of it; and the
naive way of generating, one full forward over the context for every new token (nanoGPT's sample loop),
whose time per token is the prefill's time for the whole batch; rows up to --naive_check tokens of
context (1024 by default) also time that forward itself (GPT.hidden, the head on the last position only,
as nanoGPT's) and report how far its last logits lie from the prefill's. Rows whose state and activations
would not fit the device, or that start after --time_budget seconds (shared out between the models; a
model's first row runs once compiled, however late), are skipped with a note. --profile runs one more decode
block after the timed ones of each model's first row, under the profiler, and prints where a decode step's
device time goes, kernel by kernel. --decode_only times decoding alone, from an empty state whose length is the
context (a step's work does not depend on the state's values), without the prefill and its compile: minutes
for GPT-2 Medium's Pallas kernels on an H100, against seconds for the decode step. --tiny swaps in a 2-layer
model for a smoke run on CPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import time
from pathlib import Path

# The largest KV caches (batch 8 x 32k, batch 64 x 4k: 26 GB) need more than JAX's default 75 % pool.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlin.generate.cache import forward, init_cache, logits  # noqa: E402
from jaxlin.generate.loop import NO_TOKEN, Generator, start_decoding  # noqa: E402
from jaxlin.generate.sampling import GREEDY, row_keys  # noqa: E402
from jaxlin.model import GPT, ModelConfig  # noqa: E402
from jaxlin.train import profiling  # noqa: E402

MODELS = ("gla", "gated_deltanet", "softmax")
# Memory bandwidth (bytes/s) by device kind, for the bound; others default to an H100 SXM's.
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
# GPT-2 Medium and its attention settings in the reference configs (configs/gpt2_medium_*.py).
GPT2_MEDIUM = dict(n_layer=24, n_head=16, n_embd=1024, dtype="bfloat16")
TINY = dict(n_layer=2, n_head=2, n_embd=64, dtype="float32")
ATTENTION = {
    "gla": dict(attn="gla", expand_k=0.5),
    "gated_deltanet": dict(attn="gated_deltanet", expand_k=1.0),
    "softmax": dict(attn="softmax", pos_embedding=True),
}


def device_bandwidth(device_kind: str) -> float:
    return next((b for name, b in BANDWIDTH.items() if name in device_kind), BANDWIDTH["H100"])


def model_config(kind: str, max_positions: int, tiny: bool, impl: str = "auto", mlp_impl: str = "auto") -> ModelConfig:
    """The softmax model's block size is raised to the longest context (its position embedding); ``impl``: the
    recurrent layers' (``ModelConfig.impl``), ``mlp_impl`` the MLP's."""
    return ModelConfig(**(TINY if tiny else GPT2_MEDIUM), **ATTENTION[kind],
                       block_size=max(1024, max_positions), impl=impl, mlp_impl=mlp_impl)


def _init(graphdef, params, start, *, size):
    return init_cache(nnx.merge(graphdef, params), start, size)


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def _prefill_chunk(graphdef, params, head, tokens, cache):
    h, cache = forward(nnx.merge(graphdef, params), tokens, cache)
    return logits(h[:, -1:], head)[:, 0], cache


@functools.partial(jax.jit, static_argnames="graphdef")
def _full_forward(graphdef, params, head, tokens):
    """The naive way's step: the whole context through the model, the head on the last position."""
    h = nnx.merge(graphdef, params).hidden(tokens)
    return logits(h[:, -1:], head)[:, 0]


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def weight_bytes(generator: Generator) -> int:
    """The bytes one decode step reads of the weights: all but the embeddings (of which it gathers a row
    per token), and the tied head once in the compute dtype."""
    model = nnx.merge(generator.graphdef, generator.params)
    gathered = nbytes(model.wte[...]) + (0 if model.wpe is None else nbytes(model.wpe[...]))
    return nbytes(generator.params) - gathered + nbytes(generator.head)


def step_bytes(generator: Generator, cache_shapes, context: int, capacity: int) -> int:
    """What a decode step must move: the weights once, the recurrent state read and written, the KV cache
    up to the context read (and one slot written)."""
    total = weight_bytes(generator)
    for state in cache_shapes["layers"]:
        if "recurrent" in state:
            total += 2 * nbytes(state)
        else:
            total += nbytes((state["k"], state["v"])) * context // capacity
    return total


def blocks_run(args) -> int:
    """Decode blocks a row runs: a warm-up, the timed ones, and with --profile one more."""
    return 1 + args.repeats + bool(args.profile)


def prefill_chunk(kind: str, batch: int, capacity: int, chunk: int, n_head: int) -> int:
    """Tokens per row per prefill call: --prefill_chunk, less for softmax where a chunk's float32 attention
    scores [batch, heads, chunk, capacity] would pass 4 GiB."""
    if kind != "softmax":
        return chunk
    while chunk > 16 and batch * n_head * chunk * capacity * 4 > 4 << 30:
        chunk //= 2
    return chunk


def device_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("bytes_limit")


def _ready(x):
    return jax.block_until_ready(x)


def as_written(cache: dict, length: int) -> dict:
    """`cache` with its first `length` slots counted as written, the model's count and every KV cache's (their
    values stay as they are): the state a decode step continues from after a prompt of that length."""
    def count(path, x):
        return jnp.full_like(x, length) if path[-1] == jax.tree_util.DictKey("length") else x
    return jax.tree_util.tree_map_with_path(count, cache)


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
    """What the compiled functions of a row depend on (a recurrent model's do not depend on the context)."""

    batch: int
    capacity: int  # KV cache slots; 0 without softmax layers
    chunk: int  # prompt tokens per row per prefill call
    full_forward: int = 0  # context of the naive check's full forward; 0: none


def plan_row(generator: Generator, kind: str, batch: int, context: int, args) -> tuple[dict, Shape | None]:
    """The row's fixed columns, and its Shape; None (and a note) when it is skipped."""
    cfg = generator.config
    row = {"model": kind, "batch": batch, "context": context}
    capacity = context + blocks_run(args) * args.new_tokens if kind == "softmax" else 0
    cache_shapes = _cache_shapes(generator, batch, capacity)
    chunk = prefill_chunk(kind, batch, capacity, min(args.prefill_chunk, context), cfg.n_head)
    row["state_mib"] = nbytes(cache_shapes) / 2**20
    # Activations of a prefill call: ~12 d_model-wide values per token in the compute dtype, and for
    # softmax the float32 scores and their probabilities.
    transient = 0 if args.decode_only else batch * chunk * cfg.n_embd * 12 * cfg.compute_dtype.itemsize
    if kind == "softmax" and not args.decode_only:
        transient += batch * cfg.n_head * chunk * capacity * 6
    limit = device_memory()
    needed = 3 * nbytes(generator.params) + nbytes(cache_shapes) + transient
    if limit is not None and needed > 0.9 * limit:
        return row | {"note": f"skipped: needs ~{needed / 2**30:.0f} GiB of {limit / 2**30:.0f}"}, None
    if context % chunk and not args.decode_only:
        return row | {"note": f"skipped: context is not a multiple of the prefill chunk {chunk}"}, None
    bound_ms = 1e3 * step_bytes(generator, cache_shapes, context, max(capacity, 1)) / args.bandwidth
    full_forward = context if context <= args.naive_check and not args.decode_only else 0
    return row | {"bound_ms": bound_ms}, Shape(batch, capacity, chunk, full_forward)


@functools.lru_cache(maxsize=64)
def _cache_shapes(generator: Generator, batch: int, capacity: int):
    start = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.eval_shape(functools.partial(_init, generator.graphdef, size=capacity), generator.params, start)


def compile_shapes(generator: Generator, shapes, args) -> dict:
    """{(shape, name): compiled function} for "prefill", "decode" (and "full"): traced one after the
    other, compiled in parallel threads (XLA releases the GIL), which divides the compile time of a grid."""
    cfg, graphdef, params, head = generator.config, generator.graphdef, generator.params, generator.head
    sds = jax.ShapeDtypeStruct
    lowered = {}
    for shape in sorted(shapes):
        B, rows = shape.batch, generator.decode_rows(shape.batch)
        if not args.decode_only:
            lowered[shape, "prefill"] = _prefill_chunk.lower(graphdef, params, head, sds((B, shape.chunk), jnp.int32),
                                                             _cache_shapes(generator, B, shape.capacity))
        carry = {"cache": _cache_shapes(generator, rows, shape.capacity),
                 "logits": sds((rows, cfg.padded_vocab_size), jnp.float32), "done": sds((rows,), bool),
                 "count": sds((), jnp.int32)}
        lowered[shape, "decode"] = generator.decode_steps.lower(
            graphdef, params, head, jax.eval_shape(lambda: row_keys(0, range(rows))), carry, sds((), jnp.int32),
            sampling=GREEDY, vocab_size=cfg.vocab_size, steps=args.new_tokens, stop_tokens=(NO_TOKEN,))
        if shape.full_forward:
            lowered[shape, "full"] = _full_forward.lower(graphdef, params, head,
                                                         sds((B, shape.full_forward), jnp.int32))
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values())))


def run_row(generator: Generator, row: dict, shape: Shape, compiled: dict, args,
            profile_dir: str | None = None) -> dict:
    cfg = generator.config
    batch, context, chunk = row["batch"], row["context"], shape.chunk
    params, head = generator.params, generator.head
    # Prompts without padding: the empty cache (start 0, length 0) is all zeros.
    empty = functools.partial(jax.tree.map, lambda s: jnp.zeros(s.shape, s.dtype), _cache_shapes(generator, batch,
                                                                                                  shape.capacity))
    if args.decode_only:
        cache = as_written(empty(), context)
        last = jnp.zeros((batch, cfg.padded_vocab_size), jnp.float32)
    else:
        tokens = jax.random.randint(jax.random.key(0), (batch, context), 0, cfg.vocab_size, jnp.int32)
        prefill = compiled[shape, "prefill"]
        _ready(prefill(params, head, tokens[:, :chunk], empty()))  # warm-up
        cache = _ready(empty())
        begin = time.perf_counter()
        for offset in range(0, context, chunk):
            last, cache = prefill(params, head, tokens[:, offset:offset + chunk], cache)
        _ready(last)
        prefill_s = time.perf_counter() - begin
        row = row | {"prefill_s": prefill_s, "prefill_tok_s": batch * context / prefill_s,
                     "naive_ms_per_token": 1e3 * prefill_s}
        if shape.full_forward:
            row |= _naive_check(functools.partial(compiled[shape, "full"], params, head), tokens, last)

    rows = generator.decode_rows(batch)
    carry = start_decoding(cache, last, rows)
    decode = functools.partial(compiled[shape, "decode"], params, head, row_keys(0, range(rows)))
    carry, _ = _ready(decode(carry, jnp.int32(args.new_tokens)))  # warm-up
    times = []
    for _ in range(args.repeats):
        begin = time.perf_counter()
        carry, out = _ready(decode(carry, jnp.int32(args.new_tokens)))
        times.append(time.perf_counter() - begin)
        assert int(np.asarray(out[:batch]).min()) >= 0
    ms = 1e3 * float(np.median(times)) / args.new_tokens
    row |= {"decode_ms_per_step": ms, "decode_tok_s": batch * 1e3 / ms, "bound_fraction": row["bound_ms"] / ms}
    if "naive_ms_per_token" in row:
        row["speedup_vs_naive"] = row["naive_ms_per_token"] / ms
    if profile_dir:  # one more block, continuing from the timed ones, under the profiler
        trace = profiling.trace(lambda: decode(carry, jnp.int32(args.new_tokens)), log_dir=profile_dir)
        row["profile"] = profiling.device_kernel_times(trace, steps=args.new_tokens)
    return row


def _naive_check(forward, tokens, prefill_logits) -> dict:
    """Times the full forward over `tokens` (after a warm-up call) and compares its last logits with the
    prefill's, relative to their spread."""
    full = _ready(forward(tokens))
    begin = time.perf_counter()
    _ready(forward(tokens))
    difference = float(jnp.max(jnp.abs(full - prefill_logits)) / jnp.std(full))
    return {"naive_measured_ms": 1e3 * (time.perf_counter() - begin), "prefill_logits_difference": difference}


COLUMNS = (("model", "{:<14}"), ("batch", "{:>5}"), ("context", "{:>7}"), ("prefill_tok_s", "{:>10.0f}"),
           ("decode_ms_per_step", "{:>8.3f}"), ("decode_tok_s", "{:>9.0f}"), ("state_mib", "{:>9.1f}"),
           ("bound_ms", "{:>8.3f}"), ("bound_fraction", "{:>7.1%}"), ("naive_ms_per_token", "{:>9.1f}"),
           ("speedup_vs_naive", "{:>8.1f}"))
HEADERS = ("model", "batch", "context", "prefill/s", "ms/step", "decode/s", "state MiB", "bound ms", "% bound",
           "naive ms", "speedup")


def format_table(rows: list[dict]) -> str:
    widths = [int("".join(c for c in fmt.split(".")[0] if c.isdigit())) for _, fmt in COLUMNS]
    lines = ["  ".join(h.rjust(w) if i > 0 else h.ljust(w) for i, (h, w) in enumerate(zip(HEADERS, widths)))]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "-".rjust(w)
                 for (key, fmt), w in zip(COLUMNS, widths)]
        lines.append("  ".join(cells) + (f"  {row['note']}" if "note" in row else ""))
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: %(default)s")
    parser.add_argument("--batch", type=_ints, default=[1, 8, 64])
    parser.add_argument("--context", type=_ints, default=[1024, 4096, 16384, 32768], help="prompt tokens per row")
    parser.add_argument("--new_tokens", type=int, default=32, help="decode steps per block")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode blocks (their median counts)")
    parser.add_argument("--prefill_chunk", type=int, default=1024, help="prompt tokens per row per prefill call")
    parser.add_argument("--bandwidth", type=float,
                        help="device memory bandwidth in bytes/s for the bound (default: an H100 SXM's 3.35e12, "
                             "an H200's 4.8e12 on one)")
    parser.add_argument("--time_budget", type=float, default=400.0,
                        help="seconds; rows that would start later are skipped (shared out between the models)")
    parser.add_argument("--naive_check", type=int, default=1024, metavar="TOKENS",
                        help="rows up to this context also time the full forward and compare its logits (0: none)")
    parser.add_argument("--decode_only", action="store_true",
                        help="time decoding alone, from an empty state of the context's length (no prefill)")
    parser.add_argument("--impl", default="auto", choices=("auto", "reference"),
                        help="the recurrent layers' impl: auto runs a decode step's convs, recurrence and norm in one "
                             "kernel on a GPU (kernels/decode_step.py); reference, in the layers' XLA ops (the token "
                             "scan; with --decode_only only, since the prefill would run it too)")
    parser.add_argument("--mlp_impl", default="auto", choices=("auto", "xla"),
                        help="the MLP's impl: auto runs a one-row decode step's second LayerNorm and MLP in one kernel "
                             "on a GPU (kernels/decode_mlp.py: softmax at batch 1); xla, in XLA's products")
    parser.add_argument("--exhaustive_autotune", action="store_true",
                        help="decode as Generator(exhaustive_autotune=True) does: XLA's GPU autotuner tries every "
                             "tiling of the step's products (the decode loop only; a longer compile)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--profile", metavar="DIR",
                        help="trace one more decode block of each model's first row here; print its kernels per step")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer float32 model (smoke test)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(MODELS)}")
    if not args.batch or not args.context or min(args.batch + args.context + [args.new_tokens, args.repeats]) < 1:
        parser.error("--batch, --context, --new_tokens and --repeats need positive values")
    if args.impl == "reference" and not args.decode_only:
        parser.error("--impl reference would prefill in the token scan (minutes at long contexts): add --decode_only")

    if args.bandwidth is None:
        args.bandwidth = device_bandwidth(jax.devices()[0].device_kind)
    rows, began = [], time.perf_counter()
    for i, kind in enumerate(models):
        deadline = began + args.time_budget * (i + 1) / len(models)
        config = model_config(kind, max(args.context) + blocks_run(args) * args.new_tokens, args.tiny, args.impl,
                              args.mlp_impl)
        generator = Generator(GPT(config, rngs=nnx.Rngs(0)), exhaustive_autotune=args.exhaustive_autotune)
        print(f"{kind}: {weight_bytes(generator) / 1e9:.3f} GB of weights read per decode step, "
              f"{1e3 * weight_bytes(generator) / args.bandwidth:.3f} ms at {args.bandwidth / 1e12:.2f} TB/s",
              flush=True)
        plans = [plan_row(generator, kind, batch, context, args) for batch in args.batch for context in args.context]
        compile_start, compiled = time.perf_counter(), {}
        if compile_start < deadline:
            compiled = compile_shapes(generator, {shape for _, shape in plans if shape is not None}, args)
            print(f"{kind}: compiled in {time.perf_counter() - compile_start:.0f} s", flush=True)
        ran = False  # whether a row of this model has been timed: its first is profiled, and runs however late
        for row, shape in plans:
            if shape is not None and (not compiled or (time.perf_counter() > deadline and ran)):
                row = row | {"note": "skipped: time budget"}
            elif shape is not None:
                try:
                    profile_dir = None
                    if args.profile and not ran:
                        profile_dir = str(Path(args.profile) / f"{kind}_b{row['batch']}_{row['context']}")
                    row = run_row(generator, row, shape, compiled, args, profile_dir)
                    ran = True
                except jax.errors.JaxRuntimeError as e:
                    if "RESOURCE_EXHAUSTED" not in str(e):
                        raise
                    row = row | {"note": "out of memory"}
            rows.append(row)
            print(format_table([row]).splitlines()[1], flush=True)
            if "profile" in row:
                print(profiling.format_table(row["profile"], top=30), flush=True)
            if "naive_measured_ms" in row:
                print(f"  full forward: {row['naive_measured_ms']:.1f} ms; its last logits differ from the "
                      f"prefill's by {row['prefill_logits_difference']:.3g} of their std", flush=True)
        del generator, compiled
        _cache_shapes.cache_clear()
    print()
    print(format_table(rows))
    print(f"device: {jax.devices()[0].device_kind}; bound: bytes a decode step must move / {args.bandwidth:.3g} B/s; "
          f"naive: one full forward over the context per new token; total {time.perf_counter() - began:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": jax.devices()[0].device_kind, "bandwidth": args.bandwidth,
                                               "new_tokens": args.new_tokens, "impl": args.impl,
                                               "mlp_impl": args.mlp_impl,
                                               "exhaustive_autotune": args.exhaustive_autotune, "rows": rows},
                                              indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
