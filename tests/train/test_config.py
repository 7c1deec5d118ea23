"""Every setting is checked once, before any data or device is touched, with the key named; list settings
take a comma-separated string or a list literal on the command line."""

import re

import pytest

from jaxlin.errors import ConfigError
from jaxlin.train.config import (RULES, apply_list_overrides, config_changes, default_config, split_list_overrides,
                                 validate)

# One value each setting must refuse. Every row of RULES needs one here (checked below).
BAD_VALUES = {
    "model.vocab_size": 0, "model.vocab_multiple": 0, "model.block_size": -1, "model.n_layer": 0,
    "model.n_head": 0, "model.n_embd": -64, "model.expand_k": 0.0, "model.expand_v": (1.0, -1.0),
    "model.norm_eps": 0.0, "model.impl": "palas",
    "data.sources": [], "data.val_fraction": 1.0, "data.seq_len": 0, "data.seed": -1, "data.encoding": "utf-9",
    "train.steps": 0, "train.batch_size": 0, "train.micro_batch_size": 0, "train.learning_rate": 0.0,
    "train.min_lr_ratio": 1.5, "train.warmup_steps": -1, "train.weight_decay": -0.1, "train.beta1": 1.0,
    "train.beta2": -0.5, "train.eps": 0.0, "train.grad_clip": 0.0, "train.seed": -3, "train.loss_chunk": 0,
    "train.max_nonfinite": 0,
    "log.every": 0, "log.eval_every": -1, "log.eval_batches": 0, "log.checkpoint_every": 0,
    "log.keep_checkpoints": 0,
    "mesh.data": 0, "mesh.fsdp": -2, "mesh.num_devices": 0, "mesh.sequence": 0,
}


def config_with(**values):
    config = default_config()
    config.model.update(n_layer=2, n_embd=64, n_head=2)
    for key, value in values.items():
        section, name = key.split(".")
        with config.ignore_type():
            config[section][name] = value
    return config


def test_every_rule_has_an_error_path_test():
    assert sorted(key for key, _, _ in RULES) == sorted(BAD_VALUES)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_value_is_refused_naming_the_key(key):
    value = BAD_VALUES[key]
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r} must be ")):
        validate(config_with(**{key: value}))


def test_good_values_pass():
    validate(config_with())
    validate(config_with(**{"mesh.data": -1, "mesh.fsdp": 2, "log.eval_every": 0, "data.encoding": "latin-1"}))


def test_all_problems_are_named_at_once():
    with pytest.raises(ConfigError, match="train.micro_batch_size=0 .*log.every=0 "):
        validate(config_with(**{"train.micro_batch_size": 0, "log.every": 0}))


@pytest.mark.parametrize("values, message", [
    ({"train.batch_size": 6, "train.micro_batch_size": 4}, "train.batch_size=6 must be a multiple of "
                                                          "train.micro_batch_size=4"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "only one of mesh.data and mesh.fsdp may be -1"),
    ({"model.attn": "softmax", "model.block_size": 64, "data.seq_len": 128}, "data.seq_len=128 exceeds "
                                                                             "model.block_size=64"),
    ({"model.attn": ("gla",)}, "model.attn lists 1 values but n_layer=2"),
    ({"model.n_head": 3}, "layer 0 (gla): the key/value widths (32, 64) (model.n_embd=64 times"),
    ({"model.attn": "softmax", "model.n_head": 5}, "layer 0 (softmax): the key/value widths (64,)"),
    ({"model.remat": "some"}, "model.remat: unknown 'some'"),
    ({"model.mlp_impl": "cuda"}, "model.mlp_impl: unknown 'cuda'"),
    ({"model.dtype": "float16"}, "model.dtype must be 'bfloat16' or 'float32'"),
    ({"mesh.sequence": 2, "data.seq_len": 63}, "mesh.sequence=2 needs data.seq_len (now 63) a multiple of it"),
    ({"mesh.sequence": 2, "model.attn": "softmax"}, "mesh.sequence=2 needs data.seq_len"),
    ({"mesh.sequence": 2, "model.pos_embedding": True}, "mesh.sequence=2 needs model.pos_embedding=False"),
])
def test_combinations_are_refused(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config_with(**values))


@pytest.mark.parametrize("value, expected", [
    ("['/data/fineweb10B']", ["/data/fineweb10B"]),
    ("('a', 'b')", ["a", "b"]),
    ("train_corpus,train_corpus_extra/*.jsonl.gz", ["train_corpus", "train_corpus_extra/*.jsonl.gz"]),
    ("/data/one", ["/data/one"]),
])
def test_list_settings_from_the_command_line(value, expected):
    argv, lists = split_list_overrides(["train.py", f"--config.data.sources={value}", "--config.train.steps=2"])
    assert argv == ["train.py", "--config.train.steps=2"] and lists == {"data.sources": expected}
    config = default_config()
    apply_list_overrides(config, lists)
    assert config.data.sources == expected
    assert split_list_overrides(["--config.data.sources", value])[1] == {"data.sources": expected}


def test_bad_list_literal_says_how_to_write_it():
    with pytest.raises(ConfigError, match="not a list literal"):
        split_list_overrides(["--config.data.sources=['a'"])


def test_config_changes_name_the_keys(tmp_path):
    config = config_with()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    assert config_changes(tmp_path / "config.json", config) == ""
    config.model.n_embd = 128
    config.train.learning_rate = 1e-3
    assert config_changes(tmp_path / "config.json", config) == \
        "model.n_embd 64 -> 128, train.learning_rate 0.0006 -> 0.001"
    assert config_changes(tmp_path / "missing.json", config) == ""
