"""Time the MLP with GELU in the products' epilogues against XLA: median ms, calls queued.

    python -m jaxlin.bench.gelu [--tokens 32768] [--width 1024]
        [--tiles KEY=VALUE[,KEY=VALUE...] ...] [--json out.json]

Rows: the ``c_fc`` product alone (XLA's cuBLAS call: the floor), the product with GELU (``h`` and
``gelu(h)``), the backward product with GELU's derivative, and the whole MLP forward+backward
(``gelu(x @ w_fc) @ w_proj``, its three gradients), each as XLA runs it and as the fused kernels
do; ``--tiles`` also times the fused products with other tiles (``kernels.gelu_matmul.Tiles``).
Two more rows place the fused forward's time: its product kernel storing ``h`` alone, and ``h``
twice, with no GELU (the main loop against cuBLAS's, then the cost of a second output).
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from absl import flags

from jaxlin.bench.common import median_ms, parse
from kernels import gelu_matmul as gm

FLAGS = flags.FlagValues()
flags.DEFINE_integer("tokens", 32 * 1024, "Rows of the products (micro-batch x sequence).", flag_values=FLAGS)
flags.DEFINE_integer("width", 1024, "The model's width d (products d x 4d and 4d x d).", flag_values=FLAGS)
flags.DEFINE_multi_string("tiles", [], "Also time the fused products with these kernels.gelu_matmul.Tiles fields "
                          "changed, KEY=VALUE[,KEY=VALUE...] (repeatable).", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Write the rows and errors here.", flag_values=FLAGS)


def _xla_mlp(x, w_fc, w_proj):
    return jnp.dot(jax.nn.gelu(jnp.dot(x, w_fc), approximate=True), w_proj)


def _parse_tiles(text):
    """``kernels.gelu_matmul.Tiles`` from ``"k=32,stages=4,epilogue=64x32"``: the fields that differ from ``Tiles()``."""
    fields = {f.name: f.type for f in dataclasses.fields(gm.Tiles)}
    changes = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --tiles {text!r}: expected KEY=VALUE items, e.g. m=128,n=64,stages=4")
        if key not in fields:
            raise SystemExit(f"error: --tiles {text!r}: unknown field {key!r} (fields: {', '.join(fields)})")
        kind = {"int": int, "tuple[int, int]": lambda v: tuple(map(int, v.split("x")))}[fields[key]]
        changes[key] = kind(value)
    return gm.Tiles(**changes)


def _stores_product(x, w, *, copies, interpret):
    """``x @ w`` from ``kernels.gelu_matmul``'s forward kernel, stored ``copies`` times in bf16, with no GELU."""
    kernel = functools.partial(gm._stores_kernel, values=lambda acc, dtype: (acc.astype(dtype),) * copies)
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.bfloat16)
    return gm._launch(kernel, (x, w), (out,) * copies, tiles=gm.TILES, interpret=interpret,
                      name=f"product_stored_{copies}x")


def _fwd_bwd(mlp):
    def run(x, w_fc, w_proj, dy):
        y, vjp = jax.vjp(mlp, x, w_fc, w_proj)
        return y, vjp(dy)
    return jax.jit(run)


def _max_rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None):
    parse(FLAGS, argv, __doc__)
    m, d = FLAGS.tokens, FLAGS.width
    interpret = jax.default_backend() != "gpu"  # the kernels' code on CPU, for checking, not timing
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (m, d), jnp.bfloat16)
    w_fc = (jax.random.normal(keys[1], (d, 4 * d)) * d ** -0.5).astype(jnp.bfloat16)
    w_proj = (jax.random.normal(keys[2], (4 * d, d)) * (4 * d) ** -0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[3], (m, d), jnp.bfloat16)
    h = jnp.dot(x, w_fc)
    w_t = w_proj.T
    xla_gelu_grad = jax.jit(lambda dy, w_t, h: (jnp.dot(dy, w_t, preferred_element_type=jnp.float32)
                                                * jax.vmap(jax.grad(lambda z: jax.nn.gelu(z, approximate=True)))(
                                                    h.astype(jnp.float32).ravel()).reshape(h.shape)
                                                ).astype(h.dtype))
    rows = {
        "product alone (XLA)": (jax.jit(jnp.dot), (x, w_fc)),
        "product + gelu (XLA)": (jax.jit(lambda x, w: (lambda h: (h, jax.nn.gelu(h, approximate=True)))(x @ w)),
                                 (x, w_fc)),
        "kernel's product, h only": (jax.jit(functools.partial(_stores_product, copies=1, interpret=interpret)),
                                     (x, w_fc)),
        "kernel's product, h twice": (jax.jit(functools.partial(_stores_product, copies=2, interpret=interpret)),
                                      (x, w_fc)),
        "product + gelu (fused)": (jax.jit(functools.partial(gm.gelu_product, interpret=interpret)), (x, w_fc)),
        "grad product * gelu' (XLA)": (xla_gelu_grad, (dy, w_t, h)),
        "grad product * gelu' (fused)": (jax.jit(functools.partial(gm.gelu_grad_product, interpret=interpret)),
                                         (dy, w_t, h)),
        "mlp fwd+bwd (XLA)": (_fwd_bwd(_xla_mlp), (x, w_fc, w_proj, dy)),
        "mlp fwd+bwd (fused)": (_fwd_bwd(lambda *a: gm.gelu_mlp(*a, interpret)), (x, w_fc, w_proj, dy)),
    }
    for text in FLAGS.tiles:
        tiles = _parse_tiles(text)
        rows[f"product + gelu (fused, {text})"] = (
            jax.jit(lambda x, w, t=tiles: gm.gelu_product(x, w, tiles=t, interpret=interpret)), (x, w_fc))
        rows[f"grad product * gelu' (fused, {text})"] = (
            jax.jit(lambda dy, w_t, h, t=tiles: gm.gelu_grad_product(dy, w_t, h, tiles=t, interpret=interpret)),
            (dy, w_t, h))
    print(f"device: {jax.devices()[0].device_kind}, tokens {m}, width {d}")
    flops = 2 * m * d * 4 * d
    records, failed = [], set()
    for name, (fn, operands) in rows.items():
        try:
            ms = median_ms(fn, *operands)
        except Exception as e:  # noqa: BLE001 (tiles that do not fit in SMEM): the rest still count
            print(f"{name:<44} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            failed.add(name)
            continue
        tflops = flops / ms / 1e9 * (3 if "fwd+bwd" in name else 1) * (2 if "mlp" in name else 1)
        print(f"{name:<44} {ms:8.3f} ms  {tflops:6.0f} TFLOP/s")
        records.append(dict(row=name, ms=ms, tokens=m, width=d, device=jax.devices()[0].device_kind))
    # Every row of the kernels against XLA's, max abs error over max abs value.
    want = {"product + gelu": rows["product + gelu (XLA)"][0](x, w_fc),
            "grad product * gelu'": xla_gelu_grad(dy, w_t, h),
            "mlp fwd+bwd": rows["mlp fwd+bwd (XLA)"][0](x, w_fc, w_proj, dy),
            "kernel's product, h only": (h,), "kernel's product, h twice": (h, h)}
    errors = {}
    for name, (fn, operands) in rows.items():
        if ("fused" in name or name.startswith("kernel's")) and name not in failed:
            got = fn(*operands)
            errors[name] = max(_max_rel_err(a, b) for a, b in zip(jax.tree.leaves(got),
                                                                    jax.tree.leaves(want[name.split(" (")[0]])))
            print(f"{name:<44} max error vs XLA {errors[name]:.1e}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(dict(rows=records, errors=errors), f, indent=1)


if __name__ == "__main__":
    main()
