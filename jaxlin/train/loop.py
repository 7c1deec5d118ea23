"""The training loop: data -> jitted step -> metrics, validation, checkpoints, export."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxlin import export
from jaxlin.data.paths import resolve_data_dir, user_cache_dir
from jaxlin.data.pipeline import make_train_iterator, make_val_dataset
from jaxlin.data.prepare import prepare_corpus
from jaxlin.model import GPT
from jaxlin.train import flops, sharding
from jaxlin.train.checkpoint import Checkpointer
from jaxlin.train.config import model_config, validate
from jaxlin.train.metrics import MetricsLog
from jaxlin.train.optimizer import learning_rate_schedule, make_optimizer
from jaxlin.train.step import create_train_state, eval_step, train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def prepare_data(config: ml_collections.ConfigDict):
    """(train shards, val shards), tokenised once into a cache keyed by the sources."""
    d = config.data
    data_dir = resolve_data_dir(d.data_dir or None)
    key = hashlib.sha1(json.dumps([sorted(d.sources), d.val_fraction, str(data_dir)]).encode()).hexdigest()[:12]
    out_dir = Path(d.shards_dir) if d.shards_dir else user_cache_dir().parent / "shards" / key
    if jax.process_index() == 0:
        prepare_corpus(d.sources, out_dir, data_dir, d.val_fraction)
    sharding.barrier("prepare_data")
    return prepare_corpus(d.sources, out_dir, data_dir, d.val_fraction)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains to `config.train.steps`, resuming from the newest checkpoint in `workdir`. Returns the last metrics."""
    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t, mcfg = config.train, model_config(config)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    mesh = sharding.make_mesh(config.mesh)
    accum = t.batch_size // t.micro_batch_size
    sharding.check_batch(t.micro_batch_size, mesh)
    train_shards, val_shards = prepare_data(config)
    per_process = t.batch_size // jax.process_count()
    train_iter = make_train_iterator(train_shards, config.data.seq_len, per_process, seed=config.data.seed,
                                     segment_ids=config.data.reset_state_at_eot)
    if not val_shards:
        raise ValueError("the data has no validation split: set data.val_fraction > 0 or add *_val_*.bin shards")
    val_data = make_val_dataset(val_shards, config.data.seq_len, per_process,
                                num_batches=config.log.eval_batches, segment_ids=config.data.reset_state_at_eot)

    optimizer = make_optimizer(t)
    model = GPT(mcfg, rngs=nnx.Rngs(t.seed))
    graphdef, state = create_train_state(model, optimizer)
    state_sharding = sharding.state_sharding(state, mesh)
    state = jax.device_put(state, state_sharding)
    del model

    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.log.keep_checkpoints)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
    restored, start = checkpointer.restore_latest(abstract, train_iter)
    if restored is not None:
        state = restored
        log.info("resumed from step %d in %s", start, checkpointer.directory)
    metrics_log = MetricsLog(workdir, resume_step=start)

    try:
        batch_sharding = sharding.batch_sharding(mesh)
        step_fn = jax.jit(
            functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, loss_chunk=t.loss_chunk),
            in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None), donate_argnums=0,
        )
        eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, loss_chunk=t.loss_chunk),
                          in_shardings=(state_sharding.params, sharding.batch_sharding(mesh, accumulate=False)))
        schedule = learning_rate_schedule(t)
        matrix_params = flops.count_matrix_params(state.params, mcfg.uses_pos_embedding, mcfg.block_size, mcfg.n_embd)
        flops_per_token = flops.train_flops_per_token(mcfg, matrix_params, config.data.seq_len)
        peak = flops.peak_flops(jax.devices()[0])
        tokens_per_step = t.batch_size * config.data.seq_len

        def to_device(batch, accumulate=True):
            if accumulate:
                batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
            spec = batch_sharding if accumulate else sharding.batch_sharding(mesh, accumulate=False)
            return sharding.global_batch(batch, spec)

        def validation_loss():
            losses = [float(eval_fn(state.params, to_device(b, accumulate=False))) for b in val_data]
            return float(np.mean(losses))

        def save(step):
            checkpointer.save(step, state, train_iter, force=True)

        record = {}
        pending = None  # the previous step's metrics, read after the next step is dispatched (no stall)
        window_start, window_steps = time.perf_counter(), 0
        bar = tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True, disable=jax.process_index() != 0)

        def finish_step(step, metrics):
            nonlocal record, window_start, window_steps
            m = jax.device_get(metrics)
            if m["nonfinite_in_a_row"] >= t.max_nonfinite:
                save(int(state.step))  # the updates were skipped: these are the last good parameters
                checkpointer.wait()
                raise NonFiniteLossError(
                    f"{m['nonfinite_in_a_row']} non-finite steps in a row (up to step {step}): stopped; the last good "
                    f"state is checkpointed in {checkpointer.directory}. Lower train.learning_rate or check the data."
                )
            window_steps += 1
            if step % config.log.every and step != t.steps:
                return
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * tokens_per_step / elapsed
            record = {
                "step": step, "loss": float(m["loss"]),
                "lr": float(schedule(step - 1 - int(m["nonfinite_total"]))),
                "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens_per_s,
                "nonfinite_total": int(m["nonfinite_total"]),
            }
            if peak:
                record["mfu"] = tokens_per_s * flops_per_token / (peak * jax.device_count())
            metrics_log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            **({"mfu": f"{record['mfu']:.1%}"} if peak else {}))
            window_start, window_steps = time.perf_counter(), 0

        for step in range(start + 1, t.steps + 1):
            state, metrics = step_fn(state, to_device(next(train_iter)))
            if pending is not None:
                finish_step(*pending)
            pending = (step, metrics)
            bar.update(1)
            eval_now = config.log.eval_every and step % config.log.eval_every == 0
            if eval_now or step % config.log.checkpoint_every == 0 or step == t.steps:
                finish_step(*pending)
                pending = None
                if eval_now or step == t.steps:
                    record = {"step": step, "val_loss": validation_loss()}
                    metrics_log.write(record)
                    bar.write(f"step {step}: validation loss {record['val_loss']:.4f}")
                save(step)
                window_start, window_steps = time.perf_counter(), 0
        bar.close()
        checkpointer.wait()

        if jax.process_index() == 0:
            model = nnx.merge(graphdef, jax.device_get(state.params))
            export.save(model, workdir / "export")
            if config.log.plot:
                metrics_log.plot(workdir / "loss.png")
        return record
    finally:
        metrics_log.close()
        checkpointer.close()


def export_only(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Exports the newest checkpoint in `workdir` to `workdir/export` without training."""
    workdir = Path(workdir)
    optimizer = make_optimizer(config.train)
    graphdef, state = create_train_state(GPT(model_config(config), rngs=nnx.Rngs(0)), optimizer)
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {directory}: train first (same --config and --workdir)")
    checkpointer = Checkpointer(directory, keep=config.log.keep_checkpoints)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = checkpointer.restore_state_only(abstract)
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {directory}")
    out = workdir / "export"
    export.save(nnx.merge(graphdef, restored.params), out)
    return out
