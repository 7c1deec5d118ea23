"""Times the full train step of a config on one accelerator.

    python -m jaxlin.bench.train_step --config configs/gpt2_medium_gla.py [--config.model.remat=dots]
        [--steps 20] [--sharded] [--nophases] [--json out.json] [--profile DIR]

Random tokens at the config's micro-batch (one micro-batch per step, no accumulation). After compilation it
runs steps as the train loop does, back to back on a donated state, and reports the time per step, tokens/s,
MFU and peak memory and, with --phases, the median forward and forward+backward alone. With --profile it
also traces a few steps and prints the device time per kernel and per category, and the idle time.
"""

from __future__ import annotations

import contextlib
import functools
import pathlib
import statistics
import time

import jax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from jaxlin.bench.common import parse, report
from jaxlin.model import GPT
from jaxlin.train import flops, profiling, sharding
from jaxlin.train.config import apply_xla_flags, model_config
from jaxlin.train.optimizer import make_optimizer
from jaxlin.train.step import create_train_state, loss_fn, train_step

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt2_medium_gla.py", "Experiment config file.",
                                          flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed repetitions of each phase (median reported).", flag_values=FLAGS)
_SHARDED = flags.DEFINE_bool("sharded", False, "Use the mesh code path (explicit shardings) of train.loop.",
                             flag_values=FLAGS)
_PHASES = flags.DEFINE_bool("phases", True, "Also time forward and forward+backward alone (two more compiles).",
                            flag_values=FLAGS)
_JSON = flags.DEFINE_string("json", None, "Also write the results here.", flag_values=FLAGS)
_PROFILE = flags.DEFINE_string("profile", None, "Trace 3 steps into this directory and print where device time goes.",
                               flag_values=FLAGS)


def median_ms(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def chained_steps(step_fn, state, batch, steps: int):
    """Dispatches `steps` steps back to back, each on the last one's (donated) state, as the train loop does,
    then waits; returns (state, ms per step). Waiting after every step instead would add the host's time to
    dispatch the next step (32 ms for GPT-2 Medium) to each step."""
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = step_fn(state, batch)
    jax.block_until_ready(state)
    return state, (time.perf_counter() - start) * 1e3 / steps


def bench(config, steps: int, sharded: bool, phases: bool = True, profile_dir: str | None = None) -> dict:
    t, mcfg = config.train, model_config(config)
    B, T = t.micro_batch_size, config.data.seq_len
    optimizer = make_optimizer(t)
    graphdef, state = create_train_state(GPT(mcfg, rngs=nnx.Rngs(0)), optimizer)
    tokens = jax.random.randint(jax.random.key(1), (1, B, T + 1), 0, mcfg.vocab_size)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
    micro = jax.tree.map(lambda x: x[0], batch)
    step = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, loss_chunk=t.loss_chunk)
    loss = functools.partial(loss_fn, graphdef=graphdef, loss_chunk=t.loss_chunk)
    if sharded:
        mesh = sharding.make_mesh(config.mesh)
        state_sharding = sharding.state_sharding(state, mesh)
        state = jax.device_put(state, state_sharding)
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        step_fn = jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                          out_shardings=(state_sharding, None), donate_argnums=0)
    else:
        step_fn = jax.jit(step, donate_argnums=0)
    fwd = jax.jit(lambda p, b: loss(p, batch=b))
    fwd_bwd = jax.jit(jax.value_and_grad(lambda p, b: loss(p, batch=b)))
    results = {"config": mcfg.to_dict(), "micro_batch": B, "seq_len": T, "sharded": sharded,
               "device": jax.devices()[0].device_kind}
    with jax.set_mesh(mesh) if sharded else contextlib.nullcontext():
        step_fn = step_fn.lower(state, batch).compile()  # once: timing, profile and HLO share it
        state, _ = chained_steps(step_fn, state, batch, steps=2)  # warm-up
        state, results["step_ms"] = chained_steps(step_fn, state, batch, steps)
        stats = jax.devices()[0].memory_stats() or {}  # the peak of the train step alone
        results["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
        if profile_dir:
            def three_steps():
                nonlocal state
                state, _ = chained_steps(step_fn, state, batch, steps=3)
            trace = profiling.trace(three_steps, log_dir=profile_dir)
            # The optimised HLO names the fusions that the trace lists.
            (pathlib.Path(profile_dir) / "train_step.hlo.txt").write_text(step_fn.as_text())
            results["profile"] = profiling.device_kernel_times(trace, steps=3)
        if phases:
            results["forward_ms"] = median_ms(fwd, state.params, micro, steps=steps)
            results["forward_backward_ms"] = median_ms(fwd_bwd, state.params, micro, steps=steps)
            results["backward_ms"] = results["forward_backward_ms"] - results["forward_ms"]
            results["optimizer_ms"] = results["step_ms"] - results["forward_backward_ms"]
    results["tokens_per_s"] = B * T / (results["step_ms"] / 1e3)
    matrix_params = flops.count_matrix_params(state.params, mcfg.uses_pos_embedding, mcfg.block_size, mcfg.n_embd)
    results["train_flops_per_token"] = flops.train_flops_per_token(mcfg, matrix_params, T)
    peak = flops.peak_flops(jax.devices()[0])
    if peak:
        results["mfu"] = results["tokens_per_s"] * results["train_flops_per_token"] / peak
    return results


def main(argv=None):
    parse(FLAGS, argv, __doc__)
    apply_xla_flags(_CONFIG.value)
    results = bench(_CONFIG.value, _STEPS.value, _SHARDED.value, _PHASES.value, _PROFILE.value)
    if "profile" in results:
        print(profiling.format_table(results["profile"]))
    report(results, _JSON.value)


if __name__ == "__main__":
    main()
