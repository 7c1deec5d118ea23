"""Time linear-attention implementations: forward and forward+backward, median ms.

    python -m jaxlin.bench.kernels --op {gla,delta_rule,gated_delta_rule} --shape B,T,H,K,V [--shape ...]
        [--dtype bf16] [--impls reference,chunked,pallas,fla] [--json out.json] [--stages 4x2,8x1]
        [--profile DIR]

``pallas:triton`` and ``pallas:mosaic`` pin the Pallas backend (``pallas`` is "auto").

Each JAX implementation is jitted through ``jaxlin.ops.<op>(impl=...)``; forward+backward
is one jitted ``vjp`` with a fixed random cotangent that returns the output and the gradients. FLA's chunk kernel
(``chunk_gla``, ``chunk_delta_rule``, ``chunk_gated_delta_rule``; PyTorch/Triton) is timed
with ``triton.testing.do_bench`` when importable. Inputs: see ``_inputs``.
"""

import functools
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for FLA's torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from absl import flags  # noqa: E402

from jaxlin import ops  # noqa: E402
from jaxlin.bench.common import median_ms, parse  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
FLAGS = flags.FlagValues()
flags.DEFINE_enum("op", None, ["gla", "delta_rule", "gated_delta_rule"], "The op to time.", flag_values=FLAGS)
flags.DEFINE_multi_string("shape", None, "B,T,H,K,V (repeatable).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bf16", sorted(DTYPES), "Inputs' dtype.", flag_values=FLAGS)
flags.DEFINE_list("impls", ["reference", "chunked", "pallas", "fla"],
                  "Implementations: reference, chunked, pallas, pallas:triton, pallas:mosaic, fla.", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Write all rows here.", flag_values=FLAGS)
flags.DEFINE_list("stages", [], "Also time each Triton GLA kernel alone for these WARPSxSTAGES, e.g. 4x2,8x1.",
                  flag_values=FLAGS)
flags.DEFINE_string("profile", None, "Also trace each Pallas impl's forward+backward into this folder and print "
                    "each kernel's device ms.", flag_values=FLAGS)
flags.mark_flags_as_required(["op", "shape"], flag_values=FLAGS)


def _inputs(op, shape, dtype, seed=0):
    """``(args, do)``: the op's positional arguments and a random cotangent of ``o``.

    GLA gates are ``log_sigmoid(normal) / 16`` per key channel (GLA's usual range); delta-rule q and
    k are L2-normalised (as the layers do), beta is ``sigmoid(normal)`` and the gated rule's scalar
    gate ``log_sigmoid(normal + 2)`` (mostly near 0, sometimes strong).
    """
    B, T, H, K, V = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(keys[0], (B, T, H, K), dtype)
    k = jax.random.normal(keys[1], (B, T, H, K), dtype)
    v = jax.random.normal(keys[2], (B, T, H, V), dtype)
    do = jax.random.normal(keys[4], (B, T, H, V), dtype)
    if op == "gla":
        g = (jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, K))) / 16).astype(dtype)
        return (q, k, v, g), do
    q, k = ops.l2norm(q), ops.l2norm(k)
    beta = jax.nn.sigmoid(jax.random.normal(keys[5], (B, T, H))).astype(dtype)
    if op == "delta_rule":
        return (q, k, v, beta), do
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H)) + 2).astype(dtype)
    return (q, k, v, g, beta), do


def _op_function(op, impl):
    return lambda *args: getattr(ops, op)(*args, impl=impl)[0]


def _jitted(op, impl):
    """``(forward(*args), forward_backward(args, do))``, jitted."""
    f = _op_function(op, impl)

    def forward_backward(args, do):  # returns o too: otherwise XLA drops the forward's output kernel
        o, vjp = jax.vjp(f, *args)
        return o, vjp(do)

    return jax.jit(f), jax.jit(forward_backward)


def _time_jax(op, impl, args, do):
    forward, forward_backward = _jitted(op, impl)
    out = forward(*args)
    return median_ms(forward, *args), median_ms(forward_backward, args, do), out


def _pallas_kernel_profile(op, impl, args, do, log_dir, runs=5):
    """Prints the device ms of each kernel in one forward+backward of ``impl``, from a profile of ``runs``."""
    from jaxlin.train import profiling
    _, forward_backward = _jitted(op, impl)
    jax.block_until_ready(forward_backward(args, do))
    trace = profiling.trace(lambda: [forward_backward(args, do) for _ in range(runs)], log_dir)
    print(f"{impl} fwd+bwd, device ms per kernel:")
    for name, _, ms, calls in profiling.device_kernel_times(trace, steps=runs)["kernels"][:10]:
        print(f"  {ms:8.3f}  x{calls:.0f}  {name[:80]}")


def _fla_function(op):
    if op == "gla":
        from fla.ops.gla import chunk_gla
        return chunk_gla
    if op == "delta_rule":
        from fla.ops.delta_rule import chunk_delta_rule
        return chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return chunk_gated_delta_rule


def _time_fla(op, args, do):
    """``(fwd_ms, fwd_bwd_ms or None)`` of FLA's chunk kernel for ``op``, or None when FLA/torch is
    missing. The backward is None where FLA refuses it (its gated delta rule on Triton 3.4-3.7.0)."""
    try:
        import torch
        from triton.testing import do_bench
        fla_fn = _fla_function(op)
    except ImportError:
        return None
    to_torch = lambda x: torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda().to(
        torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32)
    inputs = [to_torch(x).requires_grad_() for x in args]
    tdo = to_torch(do)
    forward = lambda: fla_fn(*inputs)[0]
    forward_backward = lambda: torch.autograd.grad(fla_fn(*inputs)[0], inputs, tdo)
    bench = lambda fn: do_bench(fn, warmup=100, rep=500, return_mode="median")
    with torch.no_grad():
        fwd = bench(forward)
    try:
        return fwd, bench(forward_backward)
    except Exception as e:  # noqa: BLE001 (FLA raises plain RuntimeErrors/AssertionErrors here)
        print(f"fla backward refused: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return fwd, None


def _pallas_gla_stages(q, k, v, g, do, configs):
    """Median ms of each of the four Pallas kernels alone, per ``(num_warps, num_stages)``."""
    from kernels.common import dot_dtype_for, state_block_v
    from kernels.gla import backward, forward
    B, T, H, K = q.shape
    V = v.shape[-1]
    common = dict(dot_dtype=dot_dtype_for(q, k, v), interpret=jax.default_backend() != "gpu")
    sequential = dict(common, block_v=state_block_v(B, H, V))
    hs, _ = jax.jit(lambda: forward.state_pass(k, v, g, None, None, **sequential))()
    dht = jnp.zeros((B, H, V, K), jnp.float32)
    dhs, _ = jax.jit(lambda: backward.state_grad_pass(q, do, g, None, dht, scale=0.1, **sequential))()
    stages = {
        "state_pass": lambda **c: forward.state_pass(k, v, g, None, None, **sequential, **c),
        "chunk_outputs": lambda **c: forward.chunk_outputs(q, k, v, g, None, hs, scale=0.1, **common, **c),
        "state_grad_pass": lambda **c: backward.state_grad_pass(q, do, g, None, dht, scale=0.1, **sequential, **c),
        "chunk_grads": lambda **c: backward.chunk_grads(q, k, v, g, do, None, hs, dhs, scale=0.1, **common, **c),
    }
    for name, stage in stages.items():
        times = []
        for warps, pipeline in configs:
            try:
                times.append(f"{warps}w{pipeline}s {median_ms(jax.jit(functools.partial(stage, num_warps=warps, num_stages=pipeline))):.3f}")
            except Exception as e:  # a config Triton cannot compile (e.g. out of shared memory)
                times.append(f"{warps}w{pipeline}s failed ({type(e).__name__})")
        print(f"  {name:<16}" + "  ".join(times))


def bench_op(op, shape, dtype, impls, configs=None, profile_dir=None):
    args, do = _inputs(op, shape, dtype)
    rows, outputs = [], {}
    for impl in impls:
        if impl == "fla":
            timed = _time_fla(op, args, do)
            if timed is None:
                print("fla: not importable, skipped")
                continue
            fwd, fwd_bwd = timed
        else:
            try:
                fwd, fwd_bwd, outputs[impl] = _time_jax(op, impl, args, do)
            except Exception as e:  # noqa: BLE001 (the chunked form's memory at long T, a kernel that fails
                # to compile): the other rows still count
                print(f"{impl}: failed, {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
        rows.append(dict(impl=impl, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd))
        fwd_bwd_text = "n/a" if fwd_bwd is None else f"{fwd_bwd:.3f} ms"
        print(f"{impl}: fwd {fwd:.3f} ms, fwd+bwd {fwd_bwd_text}", flush=True)  # before a slow next row
    if not rows:
        raise SystemExit(f"{op} {shape}: no implementation ran")
    base = next((r for r in rows if r["impl"] == "reference"), rows[0])
    for r in rows:
        r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"]
        r["fwd_bwd_speedup"] = (base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                                if r["fwd_bwd_ms"] and base["fwd_bwd_ms"] else None)
    first = next(iter(outputs), None)
    ref = None if first is None else np.asarray(outputs[first], np.float32)
    for impl in list(outputs)[1:]:  # sanity: every implementation computes the same function
        err = np.linalg.norm(np.asarray(outputs[impl], np.float32) - ref) / np.linalg.norm(ref)
        print(f"{impl} vs {first}: rel err of o = {err:.2e}")
    if configs and op == "gla":
        print("pallas kernels alone, ms by num_warps/num_stages:")
        _pallas_gla_stages(*args, do, configs)
    if profile_dir:
        for impl in (impl for impl in outputs if impl.startswith("pallas")):
            _pallas_kernel_profile(op, impl, args, do, os.path.join(profile_dir, impl.replace(":", "_")))
    return rows, base["impl"]


def main(argv=None):
    parse(FLAGS, argv, __doc__)
    records = []
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, dtype {FLAGS.dtype}")
    for text in FLAGS.shape:
        shape = tuple(int(x) for x in text.split(","))
        configs = [tuple(int(x) for x in c.split("x")) for c in FLAGS.stages]
        rows, base = bench_op(FLAGS.op, shape, DTYPES[FLAGS.dtype], FLAGS.impls, configs, FLAGS.profile)
        print(f"\n{FLAGS.op} B,T,H,K,V={text} {FLAGS.dtype} (speed-up vs {base})")
        print(f"{'impl':<16}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd x':>9}{'fwd+bwd x':>11}")
        for r in rows:
            fwd_bwd = "n/a" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.3f}"
            speedup = "n/a" if r["fwd_bwd_speedup"] is None else f"{r['fwd_bwd_speedup']:.1f}"
            print(f"{r['impl']:<16}{r['fwd_ms']:>10.3f}{fwd_bwd:>12}{r['fwd_speedup']:>9.1f}{speedup:>11}")
            records.append(dict(op=FLAGS.op, shape=text, dtype=FLAGS.dtype, device=jax.devices()[0].device_kind, **r))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
