import json

import pytest

from jaxlin.train import metrics


def write_run(path, final_val):
    records = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3)] + [{"step": 3, "val_loss": final_val}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_runs_writes_a_png(tmp_path):
    a, b = write_run(tmp_path / "a.jsonl", 7.5), write_run(tmp_path / "b.jsonl", 7.9)
    out = tmp_path / "cmp.png"
    metrics.main([f"gla={a}", f"softmax={b}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_rejects_missing_files(tmp_path):
    with pytest.raises(SystemExit):
        metrics.main([f"gla={tmp_path / 'missing.jsonl'}", "--out", str(tmp_path / "x.png")])


def test_compare_runs_rejects_a_label_given_twice(tmp_path, capsys):
    a, b = write_run(tmp_path / "a.jsonl", 7.5), write_run(tmp_path / "b.jsonl", 7.9)
    with pytest.raises(SystemExit):
        metrics.main([f"gla={a}", f"gla={b}", "--out", str(tmp_path / "x.png")])
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
