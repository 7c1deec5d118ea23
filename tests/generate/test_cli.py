"""generate.py: streaming a continuation of an export, and one clear line for bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

import generate as cli
import jaxlin.generate
from jaxlin import export
from jaxlin.data.paths import resolve_data_dir
from jaxlin.data.tokenizer import get_tokenizer
from jaxlin.generate import GREEDY, generate_text
from jaxlin.model import GPT, ModelConfig


@pytest.fixture(scope="module")
def tokenizer():
    root = resolve_data_dir(None)
    if not (root / "gpt2_tokenizer" / "vocab.bpe").exists():
        pytest.skip(f"the GPT-2 tokenizer files are not in {root} (python -m jaxlin.data.download)")
    return get_tokenizer(root)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny softmax model's export (block_size 32): learned positions, a KV cache."""
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=32, attn="softmax", dtype="float32"),
                rngs=nnx.Rngs(0))
    return model, export.save(model, tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize("tuned", [False, True])  # exhaustive autotuning: an XLA GPU option, ignored on CPU
def test_streams_the_greedy_continuation(exported, tokenizer, capsys, monkeypatch, tuned):
    model, path = exported
    options, generator = [], jaxlin.generate.Generator
    monkeypatch.setattr(jaxlin.generate, "Generator", lambda m, **kw: options.append(kw) or generator(m, **kw))
    cli.main(["--model", str(path), "--prompt", "The history of", "--max_new_tokens", "6", "--temperature", "0",
              *(["--exhaustive_autotune"] if tuned else [])])
    assert options == [{"exhaustive_autotune": tuned}]
    want = generate_text(model, tokenizer, ["The history of"], max_new_tokens=6, sampling=GREEDY)[0]
    assert capsys.readouterr().out == "The history of" + want + "\n"


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt_file", "/nonexistent/prompt.txt"], "not found"),
    (["--prompt", "a" * 200], "shorten the prompt"),
    (["--prompt", "hi", "--max_new_tokens", "40"], "lower max_new_tokens to 31"),
    (["--prompt", "hi", "--top_p", "0"], "--top_p must be in"),
    (["--prompt", "hi", "--compile_cache", __file__], "is a file: give a directory"),
])
def test_bad_input_gets_one_line(exported, tokenizer, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(exported[1])] + args)
    assert exit_info.value.code != 0 and message in str(exit_info.value.code)
    assert "\n" not in str(exit_info.value.code)


@pytest.mark.slow
def test_a_second_run_loads_its_compiled_functions_from_the_compile_cache(exported, tokenizer, tmp_path):
    """Two runs in fresh processes (JAX reads the cache setting once, at a process's first compile): the
    first fills the directory with its compiled functions, the decode loop's among them; the second rewrites
    none of them (a cache miss would) and prints the same text."""
    cache, root = tmp_path / "xla", Path(cli.__file__).parent
    command = [sys.executable, "generate.py", "--model", str(exported[1]), "--prompt", "The history of",
               "--max_new_tokens", "4", "--temperature", "0", "--compile_cache", str(cache)]
    env = os.environ | {"JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    written = lambda: {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    first = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True)
    entries = written()
    assert any(name.startswith("jit__decode_steps") for name in entries), sorted(entries)
    second = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True)
    assert written() == entries
    assert second.stdout == first.stdout and first.stdout.startswith("The history of")


def test_a_missing_export_is_named(tmp_path):
    with pytest.raises(SystemExit, match="config.json not found"):
        cli.main(["--model", str(tmp_path / "nothing"), "--prompt", "hi"])


def test_streamed_text_stops_before_a_stop_string(exported, tokenizer):
    model, _ = exported
    whole = generate_text(model, tokenizer, ["The history of"], max_new_tokens=12, sampling=GREEDY)[0]
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    pieces = []
    texts = generate_text(model, tokenizer, ["The history of"], max_new_tokens=12, sampling=GREEDY,
                          stop_strings=[stop], on_text=lambda new: pieces.append(new[0]))
    assert texts == [whole[:whole.index(stop)]] and "".join(pieces) == texts[0]
