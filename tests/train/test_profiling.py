import gzip
import json

from jaxlin.train import profiling


def write_trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_device_kernel_times_sums_device_kernels_per_step(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    kernels = [("nvjet_tst_128x64", 300.0), ("nvjet_tst_128x64", 100.0), ("loop_add_fusion", 50.0),
               ("gla_chunk_fwd", 150.0)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "dur": d} for n, d in kernels]
    events.append({"ph": "X", "pid": 2, "tid": 1, "name": "python_work", "dur": 9000.0})  # host: ignored
    path = tmp_path / "t.trace.json.gz"
    write_trace(path, events)

    times = profiling.device_kernel_times(path, steps=2)

    assert times["total_ms"] == 0.3
    assert times["categories"] == {"matmul": 0.2, "pallas": 0.075, "fusion": 0.025}
    assert times["kernels"][0] == ("nvjet_tst_128x64", "matmul", 0.2, 1.0)
    assert "nvjet_tst_128x64" in profiling.format_table(times)
