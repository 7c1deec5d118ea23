import pytest

from jaxlin.train import bench
from tests.train.test_train import tiny_config


@pytest.mark.parametrize("sharded", [False, True])
def test_bench_runs_chained_steps_phases_and_profile(tmp_path, sharded):
    config = tiny_config("unused", **{"train.micro_batch_size": 2})
    results = bench.bench(config, steps=2, sharded=sharded, phases=True, profile_dir=str(tmp_path))
    assert results["step_ms"] > 0
    assert results["forward_ms"] > 0 and results["backward_ms"] is not None
    assert results["tokens_per_s"] == 2 * config.data.seq_len / (results["step_ms"] / 1e3)
    assert (tmp_path / "train_step.hlo.txt").read_text().startswith("HloModule")
    assert set(results["profile"]) >= {"kernels", "categories", "total_ms", "idle_ms", "idle_after"}
