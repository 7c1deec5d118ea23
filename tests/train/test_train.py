"""The training job end to end on the tiny config (small shapes): runs, resumes exactly, fails clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlin.data.paths import MissingDataError
from jaxlin.model import GPT
from jaxlin.train import loop
from jaxlin.train.config import model_config
from jaxlin.train.optimizer import make_optimizer
from jaxlin.train.step import create_train_state, train_step

COMPILES_AS_TRAIN_PY = True  # its runs are compared bit for bit with train.py's (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = {
    "model.n_layer": 1, "model.n_embd": 64, "model.n_head": 2, "model.block_size": 32,
    "data.seq_len": 32, "train.steps": 8, "train.batch_size": 4, "train.micro_batch_size": 2,
    "train.warmup_steps": 2, "log.every": 1, "log.eval_every": 4, "log.eval_batches": 1,
    "log.checkpoint_every": 2, "log.plot": False,
}


def tiny_config(shards_dir, **extra):
    import runpy

    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    for key, value in {**OVERRIDES, "data.shards_dir": str(shards_dir), **extra}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shards")


def losses(workdir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards_dir):
    workdir = tmp_path_factory.mktemp("full")
    loop.run(tiny_config(shards_dir), workdir)
    return workdir


@pytest.mark.slow
def test_run_writes_metrics_checkpoints_and_export(uninterrupted):
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() and np.isfinite(r["loss"]) for r in train)
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert train[-1]["loss"] < train[0]["loss"]
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6, 8]
    assert (uninterrupted / "export" / "model.safetensors").exists()
    assert list((uninterrupted / "tb").iterdir())


def run_cli(workdir, shards_dir, *extra):
    args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.shards_dir": shards_dir}.items()]
    return subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir), *args, *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_kill_and_resume_continues_the_same_loss_sequence(tmp_path, shards_dir, uninterrupted):
    proc = run_cli(tmp_path, shards_dir)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(losses(tmp_path) if (tmp_path / "metrics.jsonl").exists() else []) >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= len(losses(tmp_path)) < 8, "the kill should land mid-run"
    resumed = run_cli(tmp_path, shards_dir)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert losses(tmp_path) == losses(uninterrupted)  # bit for bit


@pytest.mark.slow
def test_unreadable_newest_checkpoint_falls_back_and_is_kept(tmp_path, shards_dir, uninterrupted, capsys):
    import shutil

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    for f in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    config = tiny_config(shards_dir)
    loop.run(config, tmp_path)
    assert "resumed from step 6" in capsys.readouterr().out
    assert losses(tmp_path)[-2:] == losses(uninterrupted)[-2:]  # steps 7-8 retrained from step 6
    assert len(list((tmp_path / "checkpoints_unreadable").iterdir())) == 1


@pytest.mark.slow
def test_checkpoint_of_another_state_stops_the_run_and_is_kept(tmp_path, shards_dir, uninterrupted):
    import shutil

    from jaxlin.train.checkpoint import CheckpointMismatchError

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(CheckpointMismatchError, match="holds another train state.*Nothing was changed"):
        loop.run(tiny_config(shards_dir, **{"model.n_layer": 2}), tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6, 8]
    assert not (tmp_path / "checkpoints_unreadable").exists()


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_training(tmp_path, shards_dir, monkeypatch):
    real = loop.create_train_state

    def poisoned(model, optimizer):
        model.wte[...] = model.wte[...].at[0, 0].set(jnp.nan)
        return real(model, optimizer)

    monkeypatch.setattr(loop, "create_train_state", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match="3 non-finite steps in a row"):
        loop.run(tiny_config(shards_dir, **{"train.max_nonfinite": 3}), tmp_path)
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) >= 3  # the state at the stop is checkpointed (its parameters are the last good ones)


@pytest.mark.slow
def test_nonfinite_update_leaves_parameters_unchanged():
    config = tiny_config("unused")
    optimizer = make_optimizer(config.train)
    model = GPT(model_config(config), rngs=nnx.Rngs(0))
    graphdef, state = create_train_state(model, optimizer)
    batch = {"inputs": jnp.ones((1, 2, 8), jnp.int32), "targets": jnp.ones((1, 2, 8), jnp.int32)}
    bad = state.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan) if p.ndim == 2 else p,
                                            state.params))
    new, metrics = train_step(bad, batch, graphdef=graphdef, optimizer=optimizer, loss_chunk=64)
    assert int(metrics["nonfinite_in_a_row"]) == 1
    for a, b in zip(jax.tree.leaves(bad.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)


def test_unknown_config_key_lists_valid_keys(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path),
                           "--config.train.learning_rat=1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "unknown config key 'train.learning_rat'" in proc.stderr and "train.learning_rate" in proc.stderr


def test_missing_data_names_file_and_fetch_command(tmp_path):
    config = tiny_config(tmp_path / "shards", **{"data.data_dir": str(tmp_path / "empty")})
    with pytest.raises(MissingDataError, match="tinyshakespeare_input.txt.*python -m jaxlin.data.download"):
        loop.run(config, tmp_path / "run")


def test_bad_batch_settings_name_the_keys(tmp_path):
    with pytest.raises(ValueError, match="train.batch_size=5 must be a multiple of train.micro_batch_size=2"):
        loop.run(tiny_config("unused", **{"train.batch_size": 5}), tmp_path)


@pytest.mark.slow
def test_export_only_writes_the_newest_checkpoint(tmp_path, shards_dir, uninterrupted):
    import shutil

    from jaxlin import export

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    out = loop.export_only(tiny_config(shards_dir), tmp_path)
    tokens = jnp.arange(16, dtype=jnp.int32)[None]
    again, _ = export.load(out)
    trained, _ = export.load(uninterrupted / "export")
    np.testing.assert_array_equal(again(tokens), trained(tokens))


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_batch():
    """[2, B/2, T] (the scan path) and [1, B, T] (no loop) take the same optimizer step."""
    config = tiny_config("unused")
    optimizer = make_optimizer(config.train)
    graphdef, state = create_train_state(GPT(model_config(config), rngs=nnx.Rngs(0)), optimizer)
    tokens = jax.random.randint(jax.random.key(3), (4, 17), 0, 50257)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    step = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, optimizer=optimizer, loss_chunk=64))
    one, m_one = step(state, jax.tree.map(lambda x: x[None], batch))
    two, m_two = step(state, jax.tree.map(lambda x: x.reshape(2, 2, -1), batch))
    np.testing.assert_allclose(m_one["loss"], m_two["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_one["grad_norm"], m_two["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != "run.lock"}


@pytest.mark.slow  # end-to-end training (the uninterrupted run)
def test_checkpoint_of_another_shape_stops_before_anything_is_written(tmp_path, shards_dir, uninterrupted):
    import shutil

    from jaxlin.train.checkpoint import CheckpointMismatchError

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"conv.k.kernel.value is float32\[4, 32\] there, "
                       r"float32\[4, 64\] here.*model.n_embd 64 -> 128.*new --workdir"):
        loop.run(tiny_config(shards_dir, **{"model.n_embd": 128}), tmp_path)
    assert snapshot(tmp_path) == before  # checkpoints, metrics.jsonl, config.json, export/ and tb/ untouched


def test_dtype_difference_is_named():
    from jaxlin.train.checkpoint import describe_difference

    saved = {"a": ((2, 3), "float32"), "b": ((4,), "float32")}
    assert describe_difference(saved, dict(saved)) is None
    assert describe_difference(saved, {**saved, "b": ((4,), "bfloat16")}) == \
        "b is float32[4] there, bfloat16[4] here"


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path, shards_dir):
    from jaxlin.train.workdir import WorkdirLockedError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from jaxlin.train.workdir import WorkdirLock\n"
         f"with WorkdirLock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=f"in use by pid {holder.pid} on "):
            loop.run(tiny_config(shards_dir), tmp_path)
        assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()  # like a crash: the operating system drops its lock
        holder.wait()
    from jaxlin.train.workdir import WorkdirLock

    assert f"pid {holder.pid}" in (tmp_path / "run.lock").read_text()  # stale: the process is gone
    with WorkdirLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / "run.lock").read_text()
    with WorkdirLock(tmp_path):  # released on exit
        pass


def test_rejected_config_keeps_config_json(tmp_path, shards_dir):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="log.keep_checkpoints=0 must be an integer >= 1"):
        loop.run(tiny_config(shards_dir, **{"log.keep_checkpoints": 0}), tmp_path)
    assert (tmp_path / "config.json").read_text() == "{}"
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow  # end-to-end training (the uninterrupted run)
def test_export_only_falls_back_past_an_unreadable_checkpoint(tmp_path, shards_dir, uninterrupted, capsys, caplog):
    import shutil

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    for f in (tmp_path / "checkpoints" / "8" / "state" / "ocdbt.process_0").rglob("*"):
        if f.is_file() and f.stat().st_size > 100_000:  # array files cut short
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    loop.export_only(tiny_config(shards_dir), tmp_path)
    assert "exported checkpoint 6" in capsys.readouterr().out
    (report,) = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert report.startswith("checkpoint 8 in ") and "\n" not in report and len(report) < 600  # one line
    assert (tmp_path / "checkpoints" / "8").is_dir()  # reported and skipped, not moved


@pytest.mark.slow  # end-to-end training (the uninterrupted run)
def test_export_only_names_what_differs(tmp_path, shards_dir, uninterrupted):
    import shutil

    from jaxlin.train.checkpoint import CheckpointMismatchError

    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(CheckpointMismatchError, match=r"float32\[4, 32\] there, float32\[4, 16\] here") as e:
        loop.export_only(tiny_config(shards_dir, **{"model.n_embd": 32}), tmp_path)
    assert "strict" not in str(e.value)
    assert not (tmp_path / "export").exists()


def test_shard_with_ids_beyond_the_vocabulary_stops_before_training(tmp_path, monkeypatch):
    from jaxlin.data.shards import write_shard
    from jaxlin.errors import DataError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_shard(tmp_path / "data" / "x_train_000.bin", np.full(4000, 50300))
    write_shard(tmp_path / "data" / "x_val_000.bin", np.full(4000, 3))
    config = tiny_config("unused", **{"data.sources": [str(tmp_path / "data")]})
    with pytest.raises(DataError, match="x_train_000.bin' holds token id 50300, but model.vocab_size is 50257"):
        loop.run(config, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_no_validation_split_stops_before_tokenising(tmp_path, monkeypatch):
    from jaxlin.errors import DataError

    monkeypatch.setattr(loop, "prepare_corpus", lambda *a, **k: pytest.fail("tokenised the sources"))
    with pytest.raises(DataError, match="no validation split: set data.val_fraction > 0"):
        loop.run(tiny_config(tmp_path / "shards", **{"data.val_fraction": 0.0}), tmp_path / "run")


@pytest.mark.parametrize("values, message", [
    ({"mesh.num_devices": 5}, "mesh.num_devices=5: 2 devices are present"),
    ({"train.micro_batch_size": 1, "train.batch_size": 4}, "train.micro_batch_size=1 must be a multiple of the 2"),
])
def test_settings_the_devices_cannot_meet_name_the_key(tmp_path, values, message):
    from jaxlin.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        loop.run(tiny_config(tmp_path / "shards", **values), tmp_path / "run")
    assert not (tmp_path / "shards").exists()  # before any data is prepared


@pytest.mark.slow  # end-to-end training (the uninterrupted run)
def test_fresh_start_sets_earlier_outputs_aside_and_says_where_everything_is(tmp_path, shards_dir, uninterrupted,
                                                                            capsys):
    import shutil

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    for f in (tmp_path / "checkpoints").rglob("*"):  # every checkpoint unreadable: training starts afresh
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"garbage")
    loop.run(tiny_config(shards_dir, **{"train.steps": 2}), tmp_path)
    out = capsys.readouterr().out
    for expected in ("fresh start: the outputs already in", "model: gla, 1 layers, width 64, ", " parameters",
                     " train + ", " validation tokens in 2 shards", "devices: 2 x cpu",
                     f"workdir: {tmp_path.resolve()}, fresh start", "done: step 2, validation loss ",
                     f"checkpoints: {tmp_path.resolve() / 'checkpoints'} (steps 2)", "metrics.jsonl",
                     f"python eval.py --model {tmp_path.resolve() / 'export'}"):
        assert expected in out, (expected, out)
    (previous,) = (tmp_path / "previous").iterdir()
    assert snapshot(previous) == {k: v for k, v in snapshot(uninterrupted).items()
                                  if k.split("/")[0] in ("config.json", "metrics.jsonl", "export", "tb")}
    assert len(list((tmp_path / "checkpoints_unreadable").iterdir())) == 3
    assert [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())][-1] == 2
