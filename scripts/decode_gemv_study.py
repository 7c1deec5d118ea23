"""Can a split-K Pallas Triton product stream GPT-2 Medium's decode weights faster than XLA's GEMMs at two rows?

A block chain without the recurrence (LayerNorm, the joined 1024x3072 product, a stand-in for the step, the
1024x1024 output product, LayerNorm, c_fc with GELU, c_proj; 24 layers with weights of their own, 32 steps in a
fori_loop as the decode loop runs them), its products by XLA (default and exhaustive tiling) or by the Pallas
kernel below in three tilings, the partial sums reduced in the XLA fusions that follow. Each chain is timed,
then traced once: its kernels per step are printed.

    PYTHONPATH=. python scripts/decode_gemv_study.py /tmp/gemv_profiles
"""
import functools, sys, time
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

CPU = jax.default_backend() == "cpu"
D = 128 if CPU else 1024
L = 2 if CPU else 24
M = 2
BW = 3.35e12
SHAPES = {"qkv": (D, 3 * D), "o": (D, D), "fc": (D, 4 * D), "proj": (4 * D, D)}
EXH = {"xla_gpu_exhaustive_tiling_search": True}


def gemv(x, w, *, bn, bk, split, warps=4, stages=3):
    """x [Mp, K] bf16, w [K, N] bf16 -> float32 partial sums [split, Mp, N]."""
    mp, k = x.shape
    n = w.shape[1]
    ks = k // split
    bk = min(bk, ks)

    def kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            return acc + plt.dot(x_ref[:, pl.ds(i * bk, bk)], w_ref[pl.ds(i * bk, bk), :])
        o_ref[...] = lax.fori_loop(0, ks // bk, body, jnp.zeros((mp, bn), jnp.float32))

    return pl.pallas_call(
        kernel, grid=(n // bn, split),
        in_specs=[pl.BlockSpec((mp, ks), lambda j, s: (0, s)), pl.BlockSpec((ks, bn), lambda j, s: (s, j))],
        out_specs=pl.BlockSpec((None, mp, bn), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((split, mp, n), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages), interpret=CPU,
    )(x, w)


def pad16(x):
    return jnp.pad(x, ((0, 16 - x.shape[0]), (0, 0)))


def pallas_mm(cfg):
    def mm(x, w):  # x [M, K] any float dtype -> [M, N] float32
        return gemv(pad16(x.astype(jnp.bfloat16)), w, **cfg).sum(0)[: x.shape[0]]
    return mm


def xla_mm(x, w):
    return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)


def ln(h):
    mu = h.mean(-1, keepdims=True)
    var = jnp.maximum((h * h).mean(-1, keepdims=True) - mu * mu, 0)
    return (h - mu) * lax.rsqrt(var + 1e-5)


def block(h, ws, mms):
    wa, wo, wf, wp = ws
    y = mms["qkv"](ln(h), wa)
    o = jnp.tanh(y[:, :D]) * jax.nn.sigmoid(y[:, 2 * D:])  # stands in for the recurrent step
    h = h + mms["o"](o, wo)
    f = jax.nn.gelu(mms["fc"](ln(h), wf), approximate=True)
    return h + mms["proj"](f, wp)


def steps(weights, h, mms, n=32):
    def body(_, h):
        for ws in weights:
            h = block(h, ws, mms)
        return h
    return lax.fori_loop(0, n, body, h)


def timeit(f, *args, reps=7):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


CANDIDATES = {
    "p1": {"qkv": dict(bn=256, bk=128, split=8), "o": dict(bn=64, bk=128, split=4),
           "fc": dict(bn=64, bk=128, split=4, warps=8), "proj": dict(bn=64, bk=128, split=16, stages=2)},
    "p2": {"qkv": dict(bn=128, bk=128, split=4), "o": dict(bn=64, bk=128, split=8),
           "fc": dict(bn=128, bk=128, split=4), "proj": dict(bn=128, bk=128, split=16)},
    "p3": {"qkv": dict(bn=64, bk=64, split=4), "o": dict(bn=32, bk=64, split=4),
           "fc": dict(bn=64, bk=64, split=2), "proj": dict(bn=64, bk=64, split=8)},
}


def main():
    from jaxlin.train import profiling
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gemv"
    key = jax.random.PRNGKey(0)
    print(jax.devices()[0].device_kind, flush=True)
    x = jax.random.normal(key, (M, D), jnp.float32)
    weights = [tuple((s[0] ** -0.5 * jax.random.normal(jax.random.fold_in(key, 100 * i + j), s)).astype(jnp.bfloat16)
                     for j, s in enumerate(SHAPES.values())) for i in range(L)]
    nbytes = sum(w.size * 2 for ws in weights for w in ws)
    xla = {name: xla_mm for name in SHAPES}
    variants = [("xla", xla, None), ("xla-exh", xla, EXH)]
    for label, cfgs in CANDIDATES.items():
        if CPU:
            cfgs = {k: dict(c, bn=min(c["bn"], 32), bk=32) for k, c in cfgs.items()}
        variants.append((label, {k: pallas_mm(c) for k, c in cfgs.items()}, None))
    ref = None
    for label, mms, opts in variants + variants[:1]:
        f = jax.jit(functools.partial(steps, mms=mms), compiler_options=opts)
        t = timeit(f, weights, x, reps=5) / 32
        y = f(weights, x)
        ref = y if ref is None else ref
        err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
        print(f"chain {label}: {t * 1e3:.4f} ms a step, {nbytes / t / 1e12:.2f} TB/s "
              f"({nbytes / BW / t * 100:.1f} % of {nbytes / 1e6:.0f} MB at 3.35 TB/s), rel err {err:.2e}", flush=True)
        trace = profiling.trace(lambda: f(weights, x), log_dir=f"{out}/{label}")
        print(profiling.format_table(profiling.device_kernel_times(trace, steps=32), top=12), flush=True)


main()
