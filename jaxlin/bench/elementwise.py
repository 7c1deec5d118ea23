"""Time the layers' element-wise steps, XLA against their Pallas kernels: the short convolutions
(``kernels.short_conv``: forward, and backward with the joined projection's gradient), the gated RMSNorm
(``kernels.gated_norm``) and the blocks' LayerNorm with its residual add (``kernels.layer_norm``). Median
ms of queued calls, and the largest difference from XLA.

    python -m jaxlin.bench.elementwise [--batch 32] [--seq 1024] [--conv 512,512,1024] [--rest 16]
        [--heads 16] [--width 1024] [--segments N] [--conv_tiles ROWS,COLS,STEPS,WARPS ...]
        [--gated_norm_tiles ROWS,WARPS ...] [--layer_norm_tiles ROWS,STEPS,WARPS ...] [--json out.json]

Defaults: GPT-2 Medium's GLA layer (q, k, v convolved; the forget gate's low-rank input passed through;
16 heads of 64 values normed). The ``--*_tiles`` options (each repeatable) also time the kernels with other tilings
(``Tiles`` of ``kernels.short_conv``, ``kernels.gated_norm``, ``kernels.layer_norm``).
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from jaxlin.bench.common import median_ms, parse
from jaxlin.ops import conv, norm
from kernels import gated_norm, layer_norm, short_conv

FLAGS = flags.FlagValues()
flags.DEFINE_integer("batch", 32, "Micro-batch.", flag_values=FLAGS)
flags.DEFINE_integer("seq", 1024, "Sequence length.", flag_values=FLAGS)
flags.DEFINE_string("conv", "512,512,1024", "Widths of the convolved pieces (q, k, v).", flag_values=FLAGS)
flags.DEFINE_string("rest", "16", "Widths of the pieces passed through.", flag_values=FLAGS)
flags.DEFINE_integer("heads", 16, "Heads of the gated norm (over the last conv width).", flag_values=FLAGS)
flags.DEFINE_integer("width", 1024, "The model's width (the LayerNorm's).", flag_values=FLAGS)
flags.DEFINE_integer("segments", 0, "Documents per row (0: no segment ids).", flag_values=FLAGS)
flags.DEFINE_multi_string("conv_tiles", [], "ROWS,COLS,STEPS,WARPS (repeatable).", flag_values=FLAGS)
flags.DEFINE_multi_string("gated_norm_tiles", [], "ROWS,WARPS (repeatable).", flag_values=FLAGS)
flags.DEFINE_multi_string("layer_norm_tiles", [], "ROWS,STEPS,WARPS (repeatable).", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Write the rows and errors here.", flag_values=FLAGS)


def _widths(text):
    return [int(w) for w in text.split(",")] if text else []


def _max_errors(want, got):
    return [float(np.abs(np.float32(a) - np.float32(b)).max() / np.abs(np.float32(a)).max())
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got))]


def _xla_and_pallas_rows(name, run, inputs, grads, moved):
    """Rows ``"{name} forward|backward (XLA|Pallas)"``: ``run(impl)(*inputs)``, and its gradients under
    ``grads``, each with its operands and the bytes it moves (``moved[direction]``)."""
    forward = lambda impl: jax.jit(run(impl))
    backward = lambda impl: jax.jit(lambda inputs, grads: jax.vjp(run(impl), *inputs)[1](grads))
    return {f"{name} {d} ({impl})": (fn(impl.lower()), args, moved[d])
            for d, fn, args in (("forward", forward, inputs), ("backward", backward, (inputs, grads)))
            for impl in ("XLA", "Pallas")}


def _conv_rows(B, T, widths, rest, segment_ids, tilings):
    keys = jax.random.split(jax.random.key(0), 3)
    y = jax.random.normal(keys[0], (B, T, sum(widths) + sum(rest)), jnp.bfloat16)
    kernels = [jax.random.uniform(k, (4, w), jnp.float32, -0.5, 0.5)
               for k, w in zip(jax.random.split(keys[1], len(widths)), widths)]
    grads = tuple(jax.random.normal(k, (B, T, w), jnp.bfloat16)
                  for k, w in zip(jax.random.split(keys[2], len(widths) + len(rest)), widths + rest))
    split = lambda impl: lambda y, kernels: sum(conv.conv_and_split(y, kernels, rest, segment_ids=segment_ids,
                                                                   impl=impl), ())
    moved = {"forward": 2 * sum(widths) * B * T * 2,  # conv columns read and written
             "backward": 2 * y.size * 2 + sum(g.size * 2 for g in grads)}  # y read and written, grads read
    forward = lambda y, k, **options: short_conv.conv_forward(y, k, widths, segment_ids, **options)
    backward = lambda y, k, g, **options: short_conv.conv_join_backward(y, k, g[:len(widths)], g[len(widths):],
                                                                         segment_ids, **options)
    kernel = jnp.concatenate(kernels, axis=1)
    return {**_xla_and_pallas_rows("conv", split, (y, kernels), grads, moved),
            **_tiled_rows("conv", tilings, short_conv.Tiles, forward, backward, (y, kernel), (y, kernel, grads),
                          moved)}


def _parse_tiles(text, tiles_type):
    """``tiles_type`` from ``"8,256,16,4"``: one integer per field, in order."""
    fields = [f.name for f in dataclasses.fields(tiles_type)]
    values = text.split(",")
    if len(values) != len(fields) or not all(v.isdigit() for v in values):
        raise SystemExit(f"error: tiling {text!r}: expected {len(fields)} integers, {','.join(fields).upper()}")
    return tiles_type(*map(int, values))


def _tiled_rows(name, tilings, tiles_type, forward, backward, forward_args, backward_args, moved):
    """Rows ``"{name} forward|backward (Pallas, {tiling})"``: the kernels called with each tiling (their
    ``tiles`` and ``interpret`` keywords)."""
    interpret = jax.default_backend() != "gpu"  # the kernels' code on CPU, for checking, not timing
    rows = {}
    for text in tilings:
        tiles = _parse_tiles(text, tiles_type)
        for direction, kernel, args in (("forward", forward, forward_args), ("backward", backward, backward_args)):
            fn = jax.jit(functools.partial(kernel, tiles=tiles, interpret=interpret))
            rows[f"{name} {direction} (Pallas, {text})"] = (fn, args, moved[direction])
    return rows


def _norm_rows(B, T, heads, dim, tilings):
    keys = jax.random.split(jax.random.key(1), 4)
    x, g, dout = (jax.random.normal(k, (B, T, heads, dim), jnp.bfloat16) for k in keys[:3])
    w = jax.random.uniform(keys[3], (dim,), jnp.float32, 0.5, 1.5)
    run = lambda impl: lambda x, g, w: norm.gated_rms_norm(x, w, g, eps=1e-5, impl=impl)
    moved = {"forward": 3 * x.size * 2, "backward": 5 * x.size * 2}  # x, g (, dout) read; out (dx, dg) written
    rows2d = [a.reshape(-1, dim) for a in (x, g, dout)]
    return {**_xla_and_pallas_rows("gated norm", run, (x, g, w), dout, moved),
            **_tiled_rows("gated norm", tilings, gated_norm.Tiles,
                          functools.partial(gated_norm.gated_norm_forward, eps=1e-5),
                          functools.partial(gated_norm.gated_norm_backward, eps=1e-5),
                          (*rows2d[:2], w), (*rows2d[:2], w, rows2d[2]), moved)}


def _layer_norm_rows(B, T, width, tilings):
    keys = jax.random.split(jax.random.key(2), 4)
    x, r, dsum, dout = (jax.random.normal(k, (B, T, width), jnp.bfloat16) for k in keys)
    graphdef, params = nnx.split(nnx.LayerNorm(width, epsilon=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                               rngs=nnx.Rngs(0)), nnx.Param)

    def run(impl):
        def sum_and_norm(x, r, params):
            ln = nnx.merge(graphdef, params)
            if impl == "pallas":
                return norm.residual_layer_norm(x, r, ln.scale[...], ln.bias[...], eps=ln.epsilon)
            return x + r, ln(x + r)
        return sum_and_norm

    moved = {"forward": 4 * x.size * 2, "backward": 5 * x.size * 2}  # x, r (, 2 grads) read; sum, norm (dx) out
    x2, r2, dsum2, dout2 = (a.reshape(-1, width) for a in (x, r, dsum, dout))
    scale, bias = params["scale"][...], params["bias"][...]
    return {**_xla_and_pallas_rows("layer norm + residual", run, (x, r, params), (dsum, dout), moved),
            **_tiled_rows("layer norm + residual", tilings, layer_norm.Tiles,
                          functools.partial(layer_norm.layer_norm_forward, eps=1e-5),
                          functools.partial(layer_norm.layer_norm_backward, eps=1e-5),
                          (x2, r2, scale, bias), (x2, r2, scale, dsum2, dout2), moved)}


def main(argv=None):
    parse(FLAGS, argv, __doc__)
    widths, rest, B, T = _widths(FLAGS.conv), _widths(FLAGS.rest), FLAGS.batch, FLAGS.seq
    segment_ids = None
    if FLAGS.segments:
        segment_ids = jnp.broadcast_to(jnp.arange(T) * FLAGS.segments // T, (B, T)).astype(jnp.int32)
    rows = {**_conv_rows(B, T, widths, rest, segment_ids, FLAGS.conv_tiles),
            **_norm_rows(B, T, FLAGS.heads, widths[-1] // FLAGS.heads, FLAGS.gated_norm_tiles),
            **_layer_norm_rows(B, T, FLAGS.width, FLAGS.layer_norm_tiles)}
    print(f"device: {jax.devices()[0].device_kind}, B {B}, T {T}, conv {widths}, rest {rest}, heads {FLAGS.heads}, "
          f"segments {FLAGS.segments}")
    records, errors = [], {}
    for name, (fn, operands, moved) in rows.items():
        ms = median_ms(fn, *operands)
        print(f"{name:<40} {ms:8.3f} ms  {moved / ms / 1e6:6.0f} GB/s")
        records.append(dict(row=name, ms=ms, batch=B, seq=T, conv=widths, rest=rest, segments=FLAGS.segments))
        if name.endswith("(Pallas)"):
            want = rows[name.replace("Pallas", "XLA")][0](*operands)
            errors[name] = _max_errors(want, fn(*operands))
            print(f"{'':<40} max error vs XLA (max abs over max abs), each output: "
                  + " ".join(f"{e:.1e}" for e in errors[name]))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(dict(rows=records, errors=errors), f, indent=1)


if __name__ == "__main__":
    main()
