"""The training loop: data -> jitted step -> metrics, validation, checkpoints, export."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxlin import export
from jaxlin.data.paths import resolve_data_dir, user_cache_dir
from jaxlin.data.pipeline import make_train_iterator, make_val_dataset
from jaxlin.data.prepare import check_token_ids, prepare_corpus, resolve_sources, split_ready_shards
from jaxlin.data.shards import read_shard
from jaxlin.errors import ConfigError, DataError, UserError
from jaxlin.layers.fp8 import split_fp8_meta
from jaxlin.model import GPT
from jaxlin.train import flops, sharding
from jaxlin.train.checkpoint import Checkpointer, NoCheckpointError
from jaxlin.train.config import config_changes, model_config, validate
from jaxlin.train.metrics import MetricsLog
from jaxlin.train.optimizer import learning_rate_schedule, make_optimizer
from jaxlin.train.step import create_train_state, eval_step, train_step
from jaxlin.train.workdir import WorkdirLock, set_aside_outputs


class NonFiniteLossError(UserError, RuntimeError):
    """Training stopped on a run of non-finite steps; the message says where the last good state is."""


NO_VALIDATION = "the data has no validation split: set data.val_fraction > 0 or add *_val_*.bin shards"


def prepare_data(config: ml_collections.ConfigDict):
    """(train shards, val shards), tokenised once into a cache keyed by the sources, checked against the
    model's vocabulary."""
    d = config.data
    data_dir = resolve_data_dir(d.data_dir or None)
    if d.val_fraction == 0 and not split_ready_shards(resolve_sources(d.sources, data_dir)[1])[1]:
        raise DataError(NO_VALIDATION)  # before tokenising: nothing would be held out
    key = hashlib.sha1(json.dumps([sorted(d.sources), d.val_fraction, str(data_dir)]).encode()).hexdigest()[:12]
    out_dir = Path(d.shards_dir) if d.shards_dir else user_cache_dir().parent / "shards" / key
    prepare = functools.partial(prepare_corpus, d.sources, out_dir, data_dir, d.val_fraction, encoding=d.encoding)
    # One process tokenises; the others wait, then read the shards it wrote (a manifest hit).
    first = jax.process_index() == 0
    shards = prepare() if first else None
    sharding.barrier("prepare_data")
    train, val = shards if first else prepare()
    check_token_ids(train + val, config.model.vocab_size)
    return train, val


def abstract_train_state(config: ml_collections.ConfigDict):
    """(graphdef, the train state's shapes and dtypes) without computing it."""
    optimizer = make_optimizer(config.train)
    return nnx.eval_shape(lambda: create_train_state(GPT(model_config(config), rngs=nnx.Rngs(0)), optimizer))


def check_checkpoints(config: ml_collections.ConfigDict, workdir: Path) -> Checkpointer:
    """Opens WORKDIR/checkpoints; stops before anything is written when they hold another train state."""
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.log.keep_checkpoints)
    changes = config_changes(workdir / "config.json", config)
    hint = f" The settings differ from {workdir / 'config.json'} in {changes}." if changes else ""
    try:
        checkpointer.check_compatible(abstract_train_state(config)[1], hint)
    except Exception:
        checkpointer.close()
        raise
    return checkpointer


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains to `config.train.steps`, resuming from the newest checkpoint in `workdir`. Returns the last record."""
    validate(config)
    workdir = Path(workdir)
    with WorkdirLock(workdir):
        checkpointer = check_checkpoints(config, workdir)
        try:
            mesh = make_mesh(config)
            # The mesh is current while tracing, so kernels can run per shard under shard_map (jaxlin.ops).
            with jax.set_mesh(mesh):
                trainer = Trainer(config, workdir, mesh, checkpointer)
                try:
                    return trainer.train()
                finally:
                    trainer.close()
        finally:
            checkpointer.close()


def make_mesh(config: ml_collections.ConfigDict):
    """The device mesh; settings the devices present cannot meet are a ConfigError."""
    try:
        return sharding.make_mesh(config.mesh)
    except ValueError as error:
        raise ConfigError(f"{error} (devices present: {jax.device_count()})") from None


def say(message: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


class Trainer:
    """One run's data, state, jitted steps and reporting."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path, mesh, checkpointer: Checkpointer):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        t, d, mcfg = config.train, config.data, model_config(config)
        self.accumulation = t.batch_size // t.micro_batch_size
        try:
            sharding.check_batch(t.micro_batch_size, mesh)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        train_shards, val_shards = prepare_data(config)
        if not val_shards:
            raise DataError(NO_VALIDATION)
        per_process = t.batch_size // jax.process_count()
        self.train_iter = make_train_iterator(train_shards, d.seq_len, per_process, seed=d.seed,
                                              segment_ids=d.reset_state_at_eot)
        self.val_data = make_val_dataset(val_shards, d.seq_len, per_process, num_batches=config.log.eval_batches,
                                         segment_ids=d.reset_state_at_eot)

        optimizer = make_optimizer(t)
        self.graphdef, state = create_train_state(GPT(mcfg, rngs=nnx.Rngs(t.seed)), optimizer)
        state_sharding = sharding.state_sharding(state, mesh)
        self.state = jax.device_put(state, state_sharding)
        self.checkpointer = checkpointer
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                                state_sharding)
        restored, self.start = self.checkpointer.restore_latest(abstract, self.train_iter)
        if restored is not None:
            self.state = restored
        if jax.process_index() == 0:  # only once the config is accepted and its checkpoint restored
            previous = None if self.start else set_aside_outputs(workdir)
            if previous:
                say(f"fresh start: the outputs already in {workdir} were moved to {previous}")
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        self.metrics_log = MetricsLog(workdir, resume_step=self.start)
        self.announce(mcfg, train_shards, val_shards)

        self.train_sharding = sharding.batch_sharding(mesh)
        self.eval_sharding = sharding.batch_sharding(mesh, accumulate=False)
        self.step_fn = jax.jit(
            functools.partial(train_step, graphdef=self.graphdef, optimizer=optimizer, loss_chunk=t.loss_chunk),
            in_shardings=(state_sharding, self.train_sharding), out_shardings=(state_sharding, None),
            donate_argnums=0,
        )
        self.eval_fn = jax.jit(functools.partial(eval_step, graphdef=self.graphdef, loss_chunk=t.loss_chunk),
                               in_shardings=(state_sharding.params, self.eval_sharding))
        self.schedule = learning_rate_schedule(t)
        matrix_params = flops.count_matrix_params(self.state.params, mcfg.uses_pos_embedding, mcfg.block_size,
                                                  mcfg.n_embd)
        self.flops_per_token = flops.train_flops_per_token(mcfg, matrix_params, d.seq_len)
        self.peak = flops.peak_flops(jax.devices()[0])
        self.tokens_per_step = t.batch_size * d.seq_len
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.bar = None

    def train(self) -> dict:
        t, every = self.config.train, self.config.log
        record = {}
        self.bar = tqdm(total=t.steps, initial=self.start, desc="train", dynamic_ncols=True,
                        disable=jax.process_index() != 0)
        pending = None  # (step, metrics) dispatched but not yet read
        for step in range(self.start + 1, t.steps + 1):
            self.state, metrics = self.step_fn(self.state, self.train_batch(next(self.train_iter)))
            # A step's metrics are read once the next step is dispatched: reading waits for the step, and
            # waiting right after dispatching would leave the device idle while the host dispatches the
            # next one (32 ms a step for GPT-2 Medium). A run of non-finite steps still stops one step later.
            if pending:
                record = self.finish_step(*pending) or record
            pending = (step, metrics)
            eval_now = every.eval_every and step % every.eval_every == 0
            if eval_now or step % every.checkpoint_every == 0 or step == t.steps:
                record = self.finish_step(*pending) or record
                pending = None
                if eval_now or step == t.steps:
                    record = {"step": step, "val_loss": self.validation_loss()}
                    self.metrics_log.write(record)
                    self.bar.write(f"step {step}: validation loss {record['val_loss']:.4f}")
                self.save(step)
                self.window_start, self.window_steps = time.perf_counter(), 0
        self.bar.close()
        self.checkpointer.wait()
        if jax.process_index() == 0:
            export.save(nnx.merge(self.graphdef, jax.device_get(self.state.params)), self.workdir / "export")
            if self.config.log.plot:
                self.metrics_log.plot(self.workdir / "loss.png")
            self.report(record)
        return record

    def announce(self, mcfg, train_shards, val_shards) -> None:
        """What this run is about to do, in a few lines."""
        t, d = self.config.train, self.config.data
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(split_fp8_meta(self.state.params)[0]))
        kinds = "+".join(dict.fromkeys(mcfg.per_layer("attn")))
        tokens = [sum(len(read_shard(p)) for p in shards) for shards in (train_shards, val_shards)]
        device = jax.devices()[0]
        say(f"model: {kinds}, {mcfg.n_layer} layers, width {mcfg.n_embd}, {params:,} parameters ({mcfg.dtype})\n"
            f"data: {', '.join(map(str, d.sources))} -> {tokens[0]:,} train + {tokens[1]:,} validation tokens "
            f"in {len(train_shards) + len(val_shards)} shards ({Path(train_shards[0]).parent})\n"
            f"devices: {self.mesh.size} x {device.platform} ({getattr(device, 'device_kind', '')}), mesh "
            f"{dict(self.mesh.shape)}, {jax.process_count()} process(es)\n"
            f"workdir: {self.workdir.resolve()}, "
            + (f"resumed from step {self.start}" if self.start else "fresh start")
            + f"; training to step {t.steps} in batches of {t.batch_size} x {d.seq_len} tokens")

    def report(self, record: dict) -> None:
        """Where everything is, once the run ends."""
        w = self.workdir.resolve()
        steps = ", ".join(map(str, sorted(self.checkpointer.steps())))
        loss = f", validation loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        plot = f"\n  loss curve:  {w / 'loss.png'}" if self.config.log.plot else ""
        say(f"done: step {self.config.train.steps}{loss}\n"
            f"  checkpoints: {w / 'checkpoints'} (steps {steps})\n"
            f"  metrics:     {w / 'metrics.jsonl'} (TensorBoard: {w / 'tb'}){plot}\n"
            f"  export:      {w / 'export'}\n"
            f"  score it:    python eval.py --model {w / 'export'}")

    def train_batch(self, batch: dict) -> dict:
        """[per-process batch, T] -> global [accumulation, micro_batch, T] arrays."""
        batch = {k: v.reshape(self.accumulation, -1, *v.shape[1:]) for k, v in batch.items()}
        return sharding.global_batch(batch, self.train_sharding)

    def validation_loss(self) -> float:
        return float(np.mean([float(self.eval_fn(self.state.params, sharding.global_batch(b, self.eval_sharding)))
                              for b in self.val_data]))

    def save(self, step: int) -> None:
        self.checkpointer.save(step, self.state, self.train_iter, force=True)

    def finish_step(self, step: int, metrics) -> dict | None:
        """Checks a finished step for non-finite losses and logs it when due; returns the record written."""
        t = self.config.train
        m = jax.device_get(metrics)
        if m["nonfinite_in_a_row"] >= t.max_nonfinite:
            self.save(int(self.state.step))  # the updates were skipped: these are the last good parameters
            self.checkpointer.wait()
            raise NonFiniteLossError(
                f"{m['nonfinite_in_a_row']} non-finite steps in a row (up to step {step}): stopped; the last good "
                f"state is checkpointed in {self.checkpointer.directory}. Lower train.learning_rate or check the data."
            )
        self.window_steps += 1
        self.bar.update(1)
        if step % self.config.log.every and step != t.steps:
            return None
        tokens_per_s = self.window_steps * self.tokens_per_step / (time.perf_counter() - self.window_start)
        record = {
            "step": step, "loss": float(m["loss"]),
            "lr": float(self.schedule(step - 1 - int(m["nonfinite_total"]))),
            "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens_per_s,
            "nonfinite_total": int(m["nonfinite_total"]),
        }
        postfix = dict(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if self.peak:
            record["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.mesh.size)
            postfix["mfu"] = f"{record['mfu']:.1%}"
        self.metrics_log.write(record)
        self.bar.set_postfix(**postfix)
        self.window_start, self.window_steps = time.perf_counter(), 0
        return record

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics_log.close()


def export_only(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Exports the newest readable checkpoint in `workdir` to `workdir/export` without training."""
    validate(config)
    workdir = Path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise NoCheckpointError(f"no checkpoints in {workdir / 'checkpoints'}: train first (same --config and --workdir)")
    with WorkdirLock(workdir):
        checkpointer = check_checkpoints(config, workdir)
        graphdef, abstract = abstract_train_state(config)
        try:
            restored, step = checkpointer.restore_state_only(abstract)
        finally:
            checkpointer.close()
        out = workdir / "export"
        export.save(nnx.merge(graphdef, restored.params), out)
    say(f"exported checkpoint {step} to {out.resolve()}; score it: python eval.py --model {out.resolve()}")
    return out
