import json

import pytest

from jaxlin.bench import attention_layer


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_measurement(tmp_path, capsys):
    out = tmp_path / "layer.json"
    attention_layer.main(["--dims", "16", "--lengths", "64", "--tokens", "128", "--heads", "2",
                          "--impls", "gla,softmax", "--budget_s", "0.01", "--json", str(out)])
    records = json.loads(out.read_text())["records"]
    assert [(r["impl"], r["B"], r["T"]) for r in records] == [("gla", 2, 64), ("softmax", 2, 64)]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in records)
    assert records[1]["label"] == "softmax xla"  # no GPU here
    assert "softmax/gla" in capsys.readouterr().out


@pytest.mark.slow
def test_pallas_flash_attention_runs_in_interpret_mode():
    fwd, fwd_bwd, label = attention_layer.time_shape("pallas", 1, 32, 1, 16, budget_s=0.01)
    assert fwd > 0 and fwd_bwd > 0 and label == "pallas mha"


def test_table_marks_failed_and_missing_cells():
    records = [dict(impl="gla", D=64, T=1024, B=32, fwd_ms=1.0, fwd_bwd_ms=2.0),
               dict(impl="softmax", D=64, T=1024, B=32, fwd_ms=1.0, fwd_bwd_ms=3.0),
               dict(impl="xla", D=64, T=1024, B=32, error="XlaRuntimeError: RESOURCE_EXHAUSTED")]
    last = attention_layer.format_table(records, ["gla", "fla", "softmax", "xla"]).splitlines()[-1].split()
    assert last == ["64", "1024", "32", "2.000", "3.000", "failed", "1.50"]


@pytest.mark.parametrize("argv, match", [
    (["--impls", "gla,flash"], "unknown --impls"),
    (["--lengths", "1024", "--tokens", "512"], "B = tokens // T would be 0"),
    (["--dims", "x"], "--dims must be"),
])
def test_bad_arguments(argv, match):
    with pytest.raises(SystemExit, match=match):
        attention_layer.main(argv)
