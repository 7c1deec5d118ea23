import json

import pytest

from jaxlin.bench import seq_sweep

SOFTMAX_TINY = """
from configs import tiny


def get_config():
    c = tiny.get_config()
    c.model.update(attn="softmax", block_size=32)
    return c
"""


def rows(**speeds):
    return [{"name": name, "seq_len": 1024 * 2**i, "status": "ok", "tokens_per_s": s}
            for name, values in speeds.items() for i, s in enumerate(values)]


@pytest.mark.parametrize("gla, softmax, from_len", [
    ([100, 100, 100, 100], [190, 150, 90, 50], 4096),
    ([100, 100, 100], [90, 95, 99], 1024),  # ahead everywhere
    ([100, 100, 100], [190, 90, 150], None),  # behind at the longest: no crossover
    ([100, 100, 100, 100], [90, 150, 90, 50], 4096),  # a lead at 1k that is lost again does not count
])
def test_crossover_is_where_the_lead_starts_and_holds(gla, softmax, from_len):
    assert seq_sweep.crossover(rows(gla=gla, softmax=softmax), "gla", "softmax")["from_len"] == from_len


def test_crossover_ignores_failed_rows():
    measured = rows(gla=[100, 100, 100], softmax=[190, 90, 50])
    measured[-1]["status"] = "out of memory"
    assert seq_sweep.crossover(measured, "gla", "softmax") == {"from_len": 2048, "lengths": [1024, 2048]}


def test_row_config_grows_learned_positions_to_t(tmp_path):
    path = tmp_path / "softmax_tiny.py"
    path.write_text(SOFTMAX_TINY)
    config = seq_sweep.row_config(path, 64, 2)
    assert (config.data.seq_len, config.train.micro_batch_size, config.train.batch_size) == (64, 2, 2)
    assert config.model.block_size == 64


def test_bad_arguments_are_refused_before_any_row():
    with pytest.raises(SystemExit, match="not a multiple of T"):
        seq_sweep.main(["--configs", "tiny", "--lengths", "48", "--tokens", "128"])
    with pytest.raises(SystemExit, match="no config 'nope'"):
        seq_sweep.main(["--configs", "nope", "--lengths", "32", "--tokens", "128"])


@pytest.mark.slow
def test_cpu_smoke_sweep_with_a_failing_row(tmp_path, capsys):
    """Rows in their own processes: a failing config is reported and the others still run."""
    (tmp_path / "softmax_tiny.py").write_text(SOFTMAX_TINY)
    (tmp_path / "broken.py").write_text("def get_config():\n    raise ValueError('no such model')\n")
    out = tmp_path / "sweep.json"
    seq_sweep.main(["--configs", f"tiny,{tmp_path / 'broken.py'},{tmp_path / 'softmax_tiny.py'}",
                    "--lengths", "32,64", "--tokens", "128", "--steps", "1", "--json", str(out)])
    record = json.loads(out.read_text())
    status = {(r["name"].split("/")[-1], r["seq_len"]): r["status"] for r in record["rows"]}
    assert status[("tiny", 32)] == status[("softmax_tiny.py", 64)] == "ok"
    assert "no such model" in status[("broken.py", 32)]
    ok = [r for r in record["rows"] if r["status"] == "ok"]
    assert len(ok) == 4 and all(r["tokens_per_s"] > 0 and r["train_flops_per_token"] > 0 for r in ok)
    assert [c["config"] for c in record["crossover"]] == ["tiny", str(tmp_path / "broken.py")]
    text = capsys.readouterr().out
    assert "tokens/s" in text and "vs " in text
