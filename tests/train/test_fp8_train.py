"""Training with model.matmul_precision="fp8" end to end on the tiny config: checkpoints hold the scaling
state, so a killed run resumes bit for bit."""

import signal
import time

import numpy as np
import pytest

from jaxlin.train import loop
from tests.train.test_train import losses, run_cli, tiny_config

COMPILES_AS_TRAIN_PY = True  # its runs are compared bit for bit with train.py's (tests/conftest.py)

FP8 = {"model.matmul_precision": "fp8", "model.fp8_amax_history": 4}


@pytest.mark.slow
def test_fp8_kill_and_resume_continues_the_same_loss_sequence(tmp_path_factory):
    shards_dir = tmp_path_factory.mktemp("shards")
    uninterrupted = tmp_path_factory.mktemp("full")
    loop.run(tiny_config(shards_dir, **FP8), uninterrupted)
    reference = losses(uninterrupted)
    assert len(reference) == 8 and all(np.isfinite(loss) for _, loss in reference)

    workdir = tmp_path_factory.mktemp("killed")
    flags = [f"--config.{k}={v}" for k, v in FP8.items()]
    proc = run_cli(workdir, shards_dir, *flags)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(losses(workdir) if (workdir / "metrics.jsonl").exists() else []) >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= len(losses(workdir)) < 8, "the kill should land mid-run"
    resumed = run_cli(workdir, shards_dir, *flags)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert losses(workdir) == reference  # bit for bit: the scales and histories came back with the weights


@pytest.mark.slow
def test_bench_times_an_fp8_step_on_a_mesh():
    from jaxlin.bench import train_step as bench

    config = tiny_config("unused", **FP8, **{"train.micro_batch_size": 2})
    results = bench.bench(config, steps=1, sharded=True, phases=False)
    assert results["config"]["matmul_precision"] == "fp8" and results["step_ms"] > 0
