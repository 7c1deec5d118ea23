import gzip
import json

from jaxlin.train import profiling


def write_trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_device_kernel_times_sums_device_kernels_per_step(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    # (name, start, duration) in µs; a copy on a second stream overlaps the matmul.
    kernels = [("nvjet_tst_128x64", 0.0, 300.0), ("Memcpy", 100.0, 50.0), ("nvjet_tst_128x64", 320.0, 100.0),
               ("loop_add_fusion", 520.0, 50.0), ("gla_chunk_fwd", 570.0, 150.0)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7 + (n == "Memcpy"), "name": n, "ts": t, "dur": d}
                     for n, t, d in kernels]
    events.append({"ph": "X", "pid": 2, "tid": 1, "name": "python_work", "ts": 0.0, "dur": 9000.0})  # host
    path = tmp_path / "t.trace.json.gz"
    write_trace(path, events)

    times = profiling.device_kernel_times(path, steps=2)

    assert times["total_ms"] == 0.325
    assert times["categories"] == {"matmul": 0.2, "pallas": 0.075, "fusion": 0.025, "copy": 0.025}
    assert times["kernels"][0] == ("nvjet_tst_128x64", "matmul", 0.2, 1.0)
    # Gaps: 300 -> 320 after the first matmul (the copy ended earlier), 420 -> 520 after the second.
    assert times["idle_ms"] == 0.06
    assert times["idle_after"] == [("nvjet_tst_128x64", 0.06, 1.0)]
    assert "nvjet_tst_128x64" in profiling.format_table(times)
