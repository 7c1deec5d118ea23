"""The command lines: the README's own commands parse as written; a user's mistake prints one line (what,
where, the fix) and a non-zero status, with the traceback only on request."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"^\s*(?:\.venv/bin/)?python (train\.py|eval\.py|-m jaxlin\.data\.prepare)\b")


def readme_commands(tool: str) -> list[list[str]]:
    """The README's commands for `tool` (code blocks and indented lines), continuation lines joined,
    comments dropped, as argument lists after the tool."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        match = COMMAND.match(line)
        if match and match.group(1) == tool:
            commands.append(shlex.split(line[match.end():], comments=True))
    return commands


def train_py(*args, env=None):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def one_line_error(proc, pattern):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr


def test_readme_lists_the_commands():
    assert len(readme_commands("train.py")) >= 3
    assert readme_commands("eval.py") and readme_commands("-m jaxlin.data.prepare")


@pytest.mark.parametrize("args", readme_commands("train.py"), ids=" ".join)
def test_readme_train_commands_parse(args):
    proc = train_py(*args, "--dry_run")
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    for arg in args:
        if arg.startswith("--config."):
            key, value = arg[len("--config."):].split("=", 1)
            section, name = key.split(".")
            if key == "data.sources":
                assert config[section][name] == ["/data/fineweb10B"]
            else:
                assert str(config[section][name]) == value


@pytest.mark.parametrize("args", readme_commands("eval.py"), ids=" ".join)
def test_readme_eval_commands_parse(args, monkeypatch):
    sys.path.insert(0, str(REPO))
    import eval as eval_cli

    calls = []
    monkeypatch.setattr(eval_cli, "run", lambda *a, **k: calls.append((a, k)))
    eval_cli.main(args)
    assert calls and calls[0][0][0].endswith("export")


def test_readme_prepare_commands_parse(monkeypatch, capsys):
    from jaxlin.data import prepare

    for args in readme_commands("-m jaxlin.data.prepare"):
        calls = []
        monkeypatch.setattr(prepare, "prepare_corpus", lambda *a, **k: calls.append((a, k)) or ([], []))
        prepare.main(args)
        assert calls[0][0][0] == ["train_corpus", "train_corpus_extra"]


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_limit_must_be_positive(limit, capsys):
    sys.path.insert(0, str(REPO))
    import eval as eval_cli

    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--model", "runs/x/export", "--limit", limit])
    assert exit_info.value.code != 0
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_bad_setting_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    args = ["--workdir", str(tmp_path), "--config.train.micro_batch_size=0"]
    one_line_error(train_py(*args), r"train.micro_batch_size=0 must be an integer >= 1")
    assert not list(tmp_path.iterdir())  # nothing written
    assert "Traceback" in train_py(*args, "--verbose").stderr


def test_unknown_key_without_config_is_one_line(tmp_path):
    proc = train_py("--workdir", str(tmp_path), "--config.train.stepz=2")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown config key 'train.stepz'") and "train.steps" in proc.stderr


def test_missing_data_is_one_line(tmp_path):
    proc = train_py("--workdir", str(tmp_path / "run"), "--data_dir", str(tmp_path / "nothing"),
                    "--config.data.shards_dir", str(tmp_path / "shards"))
    one_line_error(proc, r"missing data file 'train_corpus/tinyshakespeare_input.txt'.*python -m jaxlin.data.download")


def test_truncated_shard_is_one_line(tmp_path):
    from jaxlin.data.shards import write_shard

    write_shard(tmp_path / "data" / "a_train_000.bin", np.arange(5000))
    write_shard(tmp_path / "data" / "a_val_000.bin", np.arange(5000))
    path = tmp_path / "data" / "a_val_000.bin"
    path.write_bytes(path.read_bytes()[:-10])
    proc = train_py("--workdir", str(tmp_path / "run"), f"--config.data.sources={tmp_path / 'data'}",
                    "--config.model.n_layer=1", "--config.model.n_embd=32", "--config.model.n_head=1")
    one_line_error(proc, r"a_val_000.bin' is \d+ bytes but its header counts 5000 tokens.*truncated")


def test_missing_config_file_is_one_line(tmp_path):
    one_line_error(train_py("--config", "configs/nope.py", "--workdir", str(tmp_path)),
                   r"config file 'configs/nope.py' does not exist")


def eval_py(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "eval.py"), *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


@pytest.mark.parametrize("damage", ["missing", pytest.param("bad_json", marks=pytest.mark.slow),
                                    pytest.param("bad_weights", marks=pytest.mark.slow)])
def test_bad_export_is_one_line_and_verbose_shows_the_traceback(tmp_path, damage):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    if damage != "missing":
        (export_dir / "config.json").write_text("{not json" if damage == "bad_json" else "{}")
        (export_dir / "model.safetensors").write_bytes(b"not safetensors")
    pattern = {"missing": r"config.json not found: an export directory holds", "bad_json": r"is not valid JSON",
               "bad_weights": r"cannot be read as safetensors"}[damage]
    one_line_error(eval_py("--model", str(export_dir), "--tasks", "wikitext2"), pattern)
    assert "Traceback" in eval_py("--model", str(export_dir), "--tasks", "wikitext2", "--verbose").stderr
