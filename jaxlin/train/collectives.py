"""The collectives of a config's compiled train step, read from the optimized HLO.

    python -m jaxlin.train.collectives --config configs/gpt2_medium_gla.py --devices 8 \
        --config.mesh.data=1 --config.mesh.fsdp=-1 [--config.model.n_layer=2] [--json out.json] \
        [--step_ms 148.6]

Compiles (never runs) the real train step on abstract arrays under the config's mesh. `--devices N` emulates
N CPU devices (`--xla_force_host_platform_device_count`), so a multi-GPU layout can be checked on any machine.
Each collective is listed with its kind, bytes (of its result; for a reduce-scatter also of its input, the
full buffer a ring moves) and how many times one optimizer step runs it: a collective inside a while loop
(the accumulation scan) counts once per trip, from the trip count XLA recorded. With `--step_ms` (a measured
one-device step) it also prints the scaling model of `jaxlin.train.scaling`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from collections import defaultdict

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLEES = re.compile(r"\b(?:to_apply|body|condition|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # the result's bytes (summed over a tuple result)
    operand_bytes: int  # the input's: a gather's result / group, a reduce-scatter's result x group
    in_loop: bool  # inside a while loop's body
    count: int | None  # executions per call of the step; None: inside a loop of unknown trip count
    computation: str


def array_bytes(shapes: str) -> int:
    """Bytes of the arrays in an HLO shape string: 'f32[8,16]{1,0}' or '(bf16[4]{0}, f32[2]{0})'."""
    total = 0
    for dtype, dims in _ARRAY.findall(shapes):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def group_size(attributes: str) -> int:
    """Devices per replica group of a collective, from its attributes (1 where they do not say)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if m:
        axes = dict((k.strip("' "), int(v)) for k, v in (a.split("=") for a in m.group(1).split(",")))
        return math.prod(axes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attributes)
    if m:
        return len(m.group(1).split(","))
    return 1


def parse_hlo(text: str) -> list[Collective]:
    """Every collective of an HLO module's text, with its executions per call of the entry computation."""
    bodies: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("{")[0].split("(")[0]:
            current = m.group(2)
            bodies[current] = []
            if m.group(1):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None:
            bodies[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    # Executions of each computation per entry call: callers' counts times the while loops' trip counts.
    calls: dict[str, list[tuple[str, int | None, bool]]] = defaultdict(list)  # caller -> (callee, factor, loop)
    for name, lines in bodies.items():
        for line in lines:
            callees = _CALLEES.findall(line)
            for b in _BRANCHES.findall(line):
                callees += [c.strip().lstrip("%") for c in b.split(",") if c.strip()]
            if not callees:
                continue
            is_while = re.search(r"\swhile\(", line) is not None
            trips = _TRIP_COUNT.search(line)
            for callee in callees:
                if is_while:
                    calls[name].append((callee, int(trips.group(1)) if trips else None, True))
                else:
                    calls[name].append((callee, 1, False))

    counts: dict[str, int | None] = {}
    in_loop: dict[str, bool] = {}

    def visit(name, count, looped):
        if name not in bodies:
            return
        if name in counts:  # called from several places: executions add up
            counts[name] = None if counts[name] is None or count is None else counts[name] + count
            in_loop[name] = in_loop[name] or looped
        else:
            counts[name], in_loop[name] = count, looped
        for callee, factor, loop in calls[name]:
            visit(callee, None if count is None or factor is None else count * factor, looped or loop)

    visit(entry, 1, False)
    found = []
    for name, lines in bodies.items():
        if name not in counts:
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            shape, opcode, rest = m.groups()
            kind = opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            result = array_bytes(shape)
            if opcode.endswith("-start") and shape.startswith("("):
                # async forms return (operands, results[, scratch]): take the largest as the result
                parts = [array_bytes(p) for p in re.findall(r"[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?", shape)]
                result = max(parts) if kind != "reduce-scatter" else min(parts)
            group = group_size(rest)
            operand = {"all-gather": result // group, "reduce-scatter": result * group}.get(kind, result)
            found.append(Collective(kind, result, operand, in_loop[name], counts[name], name))
    return found


def summarize(collectives: list[Collective]) -> list[dict]:
    """One row per (kind, bytes, in loop): how many such collectives and their executions per step."""
    rows = defaultdict(lambda: {"collectives": 0, "per_step": 0})
    for c in collectives:
        row = rows[(c.kind, c.bytes, c.operand_bytes, c.in_loop)]
        row["collectives"] += 1
        row["per_step"] = None if row["per_step"] is None or c.count is None else row["per_step"] + c.count
    return [{"kind": k, "bytes": b, "operand_bytes": ob, "in_loop": loop, **v}
            for (k, b, ob, loop), v in sorted(rows.items(), key=lambda kv: (kv[0][0], -kv[0][1]))]


def bytes_per_step(collectives: list[Collective], kind: str | None = None) -> int:
    """Result bytes moved per optimizer step (a loop of unknown trip count raises)."""
    total = 0
    for c in collectives:
        if kind is None or c.kind == kind:
            if c.count is None:
                raise ValueError(f"{c.kind} in {c.computation} runs inside a loop of unknown trip count")
            total += c.bytes * c.count
    return total


def abstract_inputs(config, mesh):
    """(graphdef, optimizer, abstract train state, abstract batch) laid out as the train loop lays them out."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlin.model import GPT
    from jaxlin.train import sharding
    from jaxlin.train.config import model_config
    from jaxlin.train.optimizer import make_optimizer
    from jaxlin.train.step import create_train_state

    t = config.train
    optimizer = make_optimizer(t)
    graphdef, state = nnx.eval_shape(
        lambda: create_train_state(GPT(model_config(config), rngs=nnx.Rngs(0)), optimizer))
    state_sharding = sharding.state_sharding(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
    shape = (t.batch_size // t.micro_batch_size, t.micro_batch_size, config.data.seq_len)
    batch_sharding = sharding.batch_sharding(mesh)
    names = ["inputs", "targets"] + (["segment_ids"] if config.data.reset_state_at_eot else [])
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for k in names}
    return graphdef, optimizer, state, batch, state_sharding, batch_sharding


def compiled_step_text(config) -> str:
    """The optimized HLO of the config's train step under its mesh, as `train.loop` jits it."""
    import jax

    from jaxlin.train import sharding
    from jaxlin.train.step import train_step

    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.train.micro_batch_size, mesh)
    with jax.set_mesh(mesh):
        graphdef, optimizer, state, batch, state_sharding, batch_sharding = abstract_inputs(config, mesh)
        step = jax.jit(
            functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, loss_chunk=config.train.loss_chunk),
            in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None), donate_argnums=0)
        return step.lower(state, batch).compile().as_text()


def step_collectives(config) -> list[Collective]:
    return parse_hlo(compiled_step_text(config))


def param_bytes(config) -> int:
    """float32 bytes of the model's parameters."""
    import jax
    from flax import nnx

    from jaxlin.model import GPT
    from jaxlin.train.config import model_config

    params = nnx.state(nnx.eval_shape(lambda: GPT(model_config(config), rngs=nnx.Rngs(0))), nnx.Param)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def format_table(rows: list[dict]) -> str:
    lines = [f"{'kind':<19} {'MB each':>10} {'input MB':>10} {'ops':>4} {'per step':>8}  where"]
    for r in rows:
        per_step = "?" if r["per_step"] is None else str(r["per_step"])
        lines.append(f"{r['kind']:<19} {r['bytes'] / 1e6:>10.3f} {r['operand_bytes'] / 1e6:>10.3f} "
                     f"{r['collectives']:>4} {per_step:>8}  {'loop' if r['in_loop'] else 'step'}")
    return "\n".join(lines)


def _main(argv):
    del argv
    import jax
    from absl import flags

    from jaxlin.train import scaling
    from jaxlin.train.config import validate

    FLAGS = flags.FLAGS
    config = FLAGS.config
    validate(config)
    collectives = step_collectives(config)
    rows = summarize(collectives)
    print(f"{config.model.n_layer} layers, {jax.device_count()} devices, mesh {config.mesh.to_dict()}, "
          f"parameters {param_bytes(config) / 1e6:.1f} MB (float32)")
    print(format_table(rows))
    totals = {kind: bytes_per_step(collectives, kind) for kind in KINDS}
    print("per step: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in totals.items() if v))
    result = {"mesh": config.mesh.to_dict(), "devices": jax.device_count(), "collectives": rows,
              "bytes_per_step": totals}
    if FLAGS.step_ms:
        t = config.train
        ways = config.mesh.get("num_devices", -1)
        ways = (jax.device_count() if ways == -1 else ways) // config.mesh.get("sequence", 1)
        table = scaling.predict_table(collectives, accumulation=t.batch_size // t.micro_batch_size,
                                      batch=t.batch_size, micro_per_gpu=t.micro_batch_size // ways,
                                      step_s=FLAGS.step_ms / 1e3)
        print(f"model: global batch {t.batch_size} sequences, {t.micro_batch_size // ways} per GPU per micro-batch, "
              f"{FLAGS.step_ms} ms per micro-batch on one GPU")
        print(scaling.format_predictions(table))
        result["predictions"] = table
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


def main():
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/gpt2_medium_gla.py", "Experiment config file.")
    flags.DEFINE_integer("devices", 0, "Emulate this many CPU devices (0: the devices present).")
    flags.DEFINE_string("json", None, "Also write the table here.")
    flags.DEFINE_float("step_ms", 0.0, "One GPU's measured time (ms) for one micro-batch of the per-GPU size: "
                       "also print the scaling model (jaxlin.train.scaling) for 2, 8 and 64 GPUs.")
    devices = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), None)
    if devices is None and "--devices" in sys.argv:
        devices = sys.argv[sys.argv.index("--devices") + 1]
    if devices and int(devices) > 0:  # before any backend starts: XLA reads the flag once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={int(devices)}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    app.run(_main)


if __name__ == "__main__":
    main()
