import pytest

from jaxlin.bench import train_step as bench
from jaxlin.bench.common import parse
from tests.train.test_train import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_bench_runs_chained_steps_phases_and_profile(tmp_path, sharded):
    config = tiny_config("unused", **{"train.micro_batch_size": 2})
    results = bench.bench(config, steps=2, sharded=sharded, phases=True, profile_dir=str(tmp_path))
    assert results["step_ms"] > 0
    assert results["forward_ms"] > 0 and results["backward_ms"] is not None
    assert results["tokens_per_s"] == 2 * config.data.seq_len / (results["step_ms"] / 1e3)
    assert (tmp_path / "train_step.hlo.txt").read_text().startswith("HloModule")
    assert set(results["profile"]) >= {"kernels", "categories", "total_ms", "idle_ms", "idle_after"}


def test_config_overrides_are_read_from_the_given_arguments():
    parse(bench.FLAGS, ["--config", "configs/tiny.py", "--config.model.impl=chunked", "--steps", "3"], "")
    assert bench._CONFIG.value.model.impl == "chunked" and bench._STEPS.value == 3
    parse(bench.FLAGS, ["--config", "configs/tiny.py"], "")
    assert bench._CONFIG.value.model.impl == "auto" and bench._STEPS.value == 20
    with pytest.raises(SystemExit, match="no field 'nope'"):
        parse(bench.FLAGS, ["--config", "configs/tiny.py", "--config.model.nope=1"], "")
