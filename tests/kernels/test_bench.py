import json

import pytest

from kernels import bench


@pytest.mark.parametrize("op", ["gla", "delta_rule", "gated_delta_rule"])
def test_bench_writes_a_row_per_impl(op, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main([op, "--shape", "1,64,1,32,32", "--impls", "reference,chunked", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["reference", "chunked"]
    assert all(r["op"] == op and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert f"{op} B,T,H,K,V=1,64,1,32,32" in capsys.readouterr().out
