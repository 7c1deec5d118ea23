"""The kernel benchmarks on CPU (interpret mode): every row runs, is written, and is checked against XLA."""

import json

import jax
import pytest

from jaxlin.bench import elementwise, gelu
from jaxlin.bench import kernels as bench


@pytest.mark.slow
@pytest.mark.parametrize("op", ["gla", pytest.param("delta_rule", marks=pytest.mark.slow),
                                pytest.param("gated_delta_rule", marks=pytest.mark.slow)])
def test_bench_writes_a_row_per_impl(op, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--op", op, "--shape", "1,64,1,32,32", "--impls", "reference,chunked", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["reference", "chunked"]
    assert all(r["op"] == op and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert f"{op} B,T,H,K,V=1,64,1,32,32" in capsys.readouterr().out


@pytest.mark.slow
def test_gla_stages_time_each_kernel(capsys):
    bench.main(["--op", "gla", "--shape", "1,64,1,32,32", "--impls", "pallas", "--stages", "4x1"])
    out = capsys.readouterr().out
    for kernel in ("state_pass", "chunk_outputs", "state_grad_pass", "chunk_grads"):
        line = next(l for l in out.splitlines() if l.strip().startswith(kernel))
        assert "4w1s" in line and "failed" not in line


@pytest.mark.slow
def test_profile_traces_the_pallas_forward_backward(tmp_path, capsys):
    """On CPU the trace has no device kernels to list; on a GPU the same call lists them (docs/benchmarks.md)."""
    bench.main(["--op", "delta_rule", "--shape", "1,64,1,64,64", "--impls", "reference,pallas:triton,pallas:mosaic",
                "--profile", str(tmp_path)])
    out = capsys.readouterr().out
    for impl in ("pallas:triton", "pallas:mosaic"):  # each Pallas impl, one trace of its own
        assert f"{impl} fwd+bwd, device ms per kernel:" in out
        assert list(tmp_path.glob(f"{impl.replace(':', '_')}/plugins/profile/*/*.trace.json.gz"))
    assert "reference fwd+bwd" not in out


@pytest.mark.slow
@pytest.mark.parametrize("op,shape", [("gla", "1,64,1,32,64"), ("gated_delta_rule", "1,64,1,64,64")])
def test_backends_get_rows_of_their_own(tmp_path, op, shape):
    out = tmp_path / "bench.json"
    bench.main(["--op", op, "--shape", shape, "--impls", "pallas:triton,pallas:mosaic", "--json", str(out)])
    assert [r["impl"] for r in json.loads(out.read_text())] == ["pallas:triton", "pallas:mosaic"]


@pytest.mark.slow
def test_gelu_bench_times_and_checks_every_kernel_row(tmp_path, monkeypatch):
    # One call per row instead of a timing loop: interpret mode's kernels take 0.1 s a call.
    monkeypatch.setattr(gelu, "median_ms", lambda fn, *args: (jax.block_until_ready(fn(*args)), 1.0)[1])
    out = tmp_path / "gelu.json"
    gelu.main(["--tokens", "128", "--width", "64", "--tiles", "stages=2,epilogue=64x32,slots=1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 11 and all(r["ms"] > 0 for r in result["rows"])
    assert sorted(result["errors"]) == sorted(r["row"] for r in result["rows"] if "XLA" not in r["row"])
    assert all(err < 1e-2 for err in result["errors"].values())


@pytest.mark.slow
def test_elementwise_bench_times_every_row_and_checks_the_kernels(tmp_path, monkeypatch):
    monkeypatch.setattr(elementwise, "median_ms", lambda fn, *args: (jax.block_until_ready(fn(*args)), 1.0)[1])
    out = tmp_path / "elementwise.json"
    elementwise.main(["--batch", "1", "--seq", "64", "--conv", "32,32,64", "--rest", "64,8", "--heads", "2",
                      "--width", "64", "--segments", "2", "--conv_tiles", "8,32,2,4",
                      "--gated_norm_tiles", "16,2", "--layer_norm_tiles", "1,32,2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 18 and all(r["ms"] > 0 for r in result["rows"])
    assert sorted(result["errors"]) == sorted(r["row"] for r in result["rows"] if r["row"].endswith("(Pallas)"))
    assert all(max(errors) < 1e-2 for errors in result["errors"].values())


def test_bad_flags_stop_with_one_line_and_help_prints_the_flags(capsys):
    with pytest.raises(SystemExit, match="error: .*shape"):
        bench.main(["--op", "gla"])
    with pytest.raises(SystemExit, match="error: .*op"):
        bench.main(["--op", "softmax", "--shape", "1,64,1,32,32"])
    with pytest.raises(SystemExit, match="expected 4 integers, ROWS,COLS,STEPS,WARPS"):
        elementwise.main(["--batch", "1", "--seq", "64", "--conv_tiles", "8,32"])
    with pytest.raises(SystemExit) as exit:
        gelu.main(["--help"])
    assert exit.value.code == 0 and "--tokens" in capsys.readouterr().out
