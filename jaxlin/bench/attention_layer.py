"""The attention op alone, forward and forward+backward, against sequence length: GLA vs softmax.

    python -m jaxlin.bench.attention_layer [--dims 64,128] [--lengths 1024,2048,4096,8192,16384]
        [--tokens 32768] [--heads 16] [--impls gla,fla,softmax] [--json attention_layer.json]

At each head dim D and length T it times, on bf16 inputs of B = tokens // T sequences and H heads:
- ``gla``: this project's GLA op (``jaxlin.ops.gla``, impl "auto": the Pallas kernels on GPU), K = V = D,
  per-channel gates log_sigmoid(normal) / 16;
- ``fla``: FLA's ``chunk_gla`` (PyTorch/Triton) on the same inputs, when ``fla`` and ``torch`` import;
- ``softmax``: causal softmax attention (``jaxlin.ops.attention``, impl "auto": cuDNN's fused flash
  attention on GPU, XLA elsewhere); ``xla`` pins XLA's, which materialises the T x T scores (memory);
- ``pallas`` (not in the default list): the Pallas flash attention that JAX ships with a causal backward,
  ``jax.experimental.pallas.ops.gpu.attention.mha`` (Triton lowering, deprecated by JAX; default blocks),
  to compare with cuDNN. Its Mosaic GPU sibling ``attention_mgpu`` has no causal backward.
D = 64 is GPT-2 Medium's softmax head (1024 / 16); D = 128 the shape of FLA's README tables. The default
B = 32768 // T gives B = 2 at T = 16384, as those tables. Times are medians of back-to-back calls (the
JAX side) and ``triton.testing.do_bench`` (FLA), so neither includes host dispatch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for FLA's torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlin import ops  # noqa: E402
from jaxlin.ops import attention  # noqa: E402
from jaxlin.bench.common import median_ms, positive_ints  # noqa: E402
from jaxlin.bench.kernels import _inputs, _time_fla  # noqa: E402

IMPLS = ("gla", "fla", "softmax", "xla", "pallas")
FLA_MISSING = ("fla: FLA's chunk_gla is not importable (needs torch, triton and flash-linear-attention: "
               "pip install flash-linear-attention); its column is left out")


def _timed(forward, args, do, budget_s):
    """(fwd ms, fwd+bwd ms) of ``forward(*args)``, both jitted; the backward with the cotangent ``do``."""
    def forward_backward(args, do):  # returns the output too, so XLA keeps the forward's kernels
        out, vjp = jax.vjp(forward, *args)
        return out, vjp(do)
    fwd, fwd_bwd = jax.jit(forward), jax.jit(forward_backward)
    return median_ms(fwd, *args, budget_s=budget_s), median_ms(fwd_bwd, args, do, budget_s=budget_s)


def time_shape(impl: str, B: int, T: int, H: int, D: int, budget_s: float):
    """(fwd ms, fwd+bwd ms or None, label) of one implementation, or None where FLA does not import."""
    if impl in ("gla", "fla"):
        args, do = _inputs("gla", (B, T, H, D, D), jnp.bfloat16)
        if impl == "fla":
            print(f"D={D} T={T} B={B} fla: autotuning its Triton kernels for this shape (minutes the first time)",
                  flush=True)
            timed = _time_fla("gla", args, do)
            return None if timed is None else (*timed, "fla chunk_gla")
        gla_impl = "pallas" if jax.default_backend() == "gpu" else "auto"  # no silent fallback on GPU
        return (*_timed(lambda *a: ops.gla(*a, impl=gla_impl)[0], args, do, budget_s), f"gla {gla_impl}")
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(key, (B, T, H, D), jnp.bfloat16) for key in keys)
    if impl == "pallas":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu.attention import mha
        forward = lambda q, k, v: mha(q, k, v, None, sm_scale=1 / math.sqrt(D), causal=True,
                                      interpret=jax.default_backend() != "gpu")
        return (*_timed(forward, (q, k, v), do, budget_s), "pallas mha")
    chosen = "xla" if impl == "xla" else attention.resolve_impl("auto", q.dtype, D)
    forward = lambda q, k, v: attention.causal_attention(q, k, v, impl=chosen)
    return (*_timed(forward, (q, k, v), do, budget_s), f"softmax {chosen}")


def bench(impls, dims, lengths, tokens, heads, budget_s):
    records, fla_missing = [], False
    for D in dims:
        for T in lengths:
            B = tokens // T
            for impl in impls:
                if impl == "fla" and fla_missing:
                    continue
                try:
                    timed = time_shape(impl, B, T, heads, D, budget_s)
                except Exception as e:  # noqa: BLE001 (out of memory, a shape a kernel refuses): the rest still run
                    records.append(dict(impl=impl, D=D, T=T, B=B, H=heads, error=f"{type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:160]}"))
                    print(f"D={D} T={T} B={B} {impl}: failed, {records[-1]['error']}", flush=True)
                    continue
                if timed is None:
                    fla_missing = True
                    print(FLA_MISSING, flush=True)
                    continue
                fwd, fwd_bwd, label = timed
                records.append(dict(impl=impl, label=label, D=D, T=T, B=B, H=heads, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd))
                print(f"D={D} T={T} B={B} {label}: fwd {fwd:.3f} ms, fwd+bwd "
                      f"{'n/a' if fwd_bwd is None else f'{fwd_bwd:.3f} ms'}", flush=True)
    return records


def format_table(records, impls) -> str:
    """fwd+bwd ms per implementation, one line per (D, T, B), and GLA's speed-up over softmax."""
    shown = [i for i in impls if any(r["impl"] == i for r in records)]
    header = f"{'D':>4}{'T':>7}{'B':>5}" + "".join(f"{i + ' ms':>14}" for i in shown) + f"{'softmax/gla':>13}"
    lines = ["forward+backward, median ms", header, "-" * len(header)]
    for key in dict.fromkeys((r["D"], r["T"], r["B"]) for r in records):
        by_impl = {r["impl"]: r for r in records if (r["D"], r["T"], r["B"]) == key}
        cells = []
        for i in shown:
            r = by_impl.get(i)
            cells.append("failed" if r and "error" in r else "n/a" if not r or r["fwd_bwd_ms"] is None
                         else f"{r['fwd_bwd_ms']:.3f}")
        ms = {i: r.get("fwd_bwd_ms") for i, r in by_impl.items()}
        ratio = f"{ms['softmax'] / ms['gla']:.2f}" if ms.get("softmax") and ms.get("gla") else "n/a"
        lines.append(f"{key[0]:>4}{key[1]:>7}{key[2]:>5}" + "".join(f"{c:>14}" for c in cells) + f"{ratio:>13}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="64,128", help="head dims D (GLA: K = V = D)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call: B = tokens // T")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--impls", default="gla,fla,softmax", help=f"comma-separated, of {','.join(IMPLS)}")
    parser.add_argument("--budget_s", type=float, default=1.0, help="seconds of timed calls per measurement")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"error: unknown --impls {unknown}; expected some of {IMPLS}")
    dims, lengths = positive_ints(args.dims, "--dims"), positive_ints(args.lengths, "--lengths")
    short = [T for T in lengths if args.tokens < T]
    if short:
        raise SystemExit(f"error: --tokens {args.tokens} is less than T = {short}: B = tokens // T would be 0")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, H={args.heads}, bf16", flush=True)
    records = bench(impls, dims, lengths, args.tokens, args.heads, args.budget_s)
    print()
    print(format_table(records, impls))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
