"""The training config's schema and defaults; experiment files in configs/ start from `default_config()`."""

from __future__ import annotations

import ast
import codecs
import dataclasses
import json
import logging
import numbers
import os
from collections.abc import Callable
from pathlib import Path

import ml_collections

from jaxlin.errors import ConfigError
from jaxlin.model import PER_LAYER_FIELDS, ModelConfig
from jaxlin.ops.checks import IMPLS


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Per-layer fields take a scalar or a tuple, so they are typed `object` (ConfigDict is type-safe).
    c.model = ml_collections.ConfigDict({
        f.name: ml_collections.FieldReference(f.default, field_type=object)
        if f.name in PER_LAYER_FIELDS or f.default is None else f.default
        for f in dataclasses.fields(ModelConfig)
    })
    c.data = ml_collections.ConfigDict(dict(
        data_dir="",  # "" -> --data_dir flag, $JAXLIN_DATA_DIR, ../shared/data, or the user cache
        # Text sources (relative to the data dir, absolute, globs, or folders of llm.c .bin shards).
        sources=["train_corpus/tinyshakespeare_input.txt",
                 "train_corpus/fineweb_edu_sample10BT_150docs_annotated.csv"],
        shards_dir="",  # "" -> a cache folder keyed by the sources; jaxlin deletes only files its manifest lists
        encoding="utf-8",  # of the text sources (strict: a byte that does not decode stops with its offset)
        val_fraction=0.02,  # share of documents held out for validation
        seq_len=1024,
        reset_state_at_eot=False,  # True: restart the recurrence at every <|endoftext|> (packed documents)
        seed=0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=32,  # sequences per optimizer step, over all devices
        micro_batch_size=32,  # sequences per forward/backward; batch_size / micro_batch_size accumulation steps
        learning_rate=6e-4,
        min_lr_ratio=0.1,  # cosine decays to learning_rate * min_lr_ratio
        warmup_steps=100,
        weight_decay=0.1,  # matrices only
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        grad_clip=1.0,
        seed=1337,
        loss_chunk=2048,  # tokens per slice of the vocabulary projection in the loss (bounds logits memory)
        max_nonfinite=20,  # consecutive non-finite steps before training stops
        xla_flags="",  # prepended to $XLA_FLAGS by train.py and the bench (the environment's own flags win)
    ))
    c.log = ml_collections.ConfigDict(dict(
        every=10,  # steps between metric records
        eval_every=200,  # steps between validation losses (0: only at the end)
        eval_batches=8,
        checkpoint_every=200,
        keep_checkpoints=3,
        plot=True,
    ))
    # data x fsdp x sequence must equal num_devices; -1: all remaining devices (num_devices=-1: every device
    # present). sequence > 1 splits each sequence over that many devices (GLA layers only).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, num_devices=-1))
    return c


def apply_xla_flags(config: ml_collections.ConfigDict) -> None:
    """Prepends ``train.xla_flags`` to $XLA_FLAGS, so that flags already in the environment win. XLA
    reads XLA_FLAGS once, when JAX starts its first backend: call this before anything touches a device."""
    flags = config.train.get("xla_flags", "")
    if not flags:
        return
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        logging.getLogger(__name__).warning("train.xla_flags=%r not applied: a JAX backend was already started", flags)
        return
    os.environ["XLA_FLAGS"] = f"{flags} {os.environ.get('XLA_FLAGS', '')}".strip()


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig(**config.model.to_dict())


# ------------------------------------------------------------------------------------------- validation
# One row per setting: (dotted key, test of its value, what the value must be). `validate` checks every row
# present in the config, then the combinations in COMBINATIONS; a new setting needs a new row.

def _number(test: Callable, integer: bool = False) -> Callable:
    kind = numbers.Integral if integer else numbers.Real
    return lambda v: isinstance(v, kind) and not isinstance(v, bool) and test(v)


def _per_layer(test: Callable) -> Callable:
    return lambda v: all(test(x) for x in (v if isinstance(v, (tuple, list)) else (v,)))


def _codec(name) -> bool:
    try:
        return isinstance(name, str) and bool(codecs.lookup(name))
    except LookupError:
        return False


_int_at_least = lambda low: _number(lambda v: v >= low, integer=True)
_devices = _number(lambda v: v == -1 or v >= 1, integer=True)
RULES: tuple[tuple[str, Callable, str], ...] = (
    ("model.vocab_size", _int_at_least(1), "an integer >= 1"),
    ("model.vocab_multiple", _int_at_least(1), "an integer >= 1"),
    ("model.block_size", _int_at_least(1), "an integer >= 1"),
    ("model.n_layer", _int_at_least(1), "an integer >= 1"),
    ("model.n_head", _int_at_least(1), "an integer >= 1"),
    ("model.n_embd", _int_at_least(1), "an integer >= 1"),
    ("model.expand_k", _per_layer(_number(lambda v: v > 0)), "> 0 (or a tuple of such, one per layer)"),
    ("model.expand_v", _per_layer(_number(lambda v: v > 0)), "> 0 (or a tuple of such, one per layer)"),
    ("model.norm_eps", _number(lambda v: v > 0), "a number > 0"),
    ("model.impl", lambda v: v in IMPLS, f"one of {', '.join(IMPLS)}"),
    ("data.sources", lambda v: isinstance(v, (list, tuple)) and v and all(isinstance(x, str) and x for x in v),
     "a non-empty list of paths, e.g. --config.data.sources=/data/a,/data/b"),
    ("data.val_fraction", _number(lambda v: 0 <= v < 1), "a fraction in [0, 1)"),
    ("data.seq_len", _int_at_least(1), "an integer >= 1"),
    ("data.seed", _number(lambda v: 0 <= v < 2**32, integer=True), "an integer in [0, 2**32)"),
    ("data.encoding", _codec, "a text encoding Python knows, e.g. utf-8, latin-1, utf-16"),
    ("train.steps", _int_at_least(1), "an integer >= 1"),
    ("train.batch_size", _int_at_least(1), "an integer >= 1"),
    ("train.micro_batch_size", _int_at_least(1), "an integer >= 1"),
    ("train.learning_rate", _number(lambda v: v > 0), "a number > 0"),
    ("train.min_lr_ratio", _number(lambda v: 0 <= v <= 1), "a number in [0, 1]"),
    ("train.warmup_steps", _int_at_least(0), "an integer >= 0"),
    ("train.weight_decay", _number(lambda v: v >= 0), "a number >= 0"),
    ("train.beta1", _number(lambda v: 0 <= v < 1), "a number in [0, 1)"),
    ("train.beta2", _number(lambda v: 0 <= v < 1), "a number in [0, 1)"),
    ("train.eps", _number(lambda v: v > 0), "a number > 0"),
    ("train.grad_clip", _number(lambda v: v > 0), "a number > 0"),
    ("train.seed", _int_at_least(0), "an integer >= 0"),
    ("train.loss_chunk", _int_at_least(1), "an integer >= 1"),
    ("train.max_nonfinite", _int_at_least(1), "an integer >= 1"),
    ("log.every", _int_at_least(1), "an integer >= 1"),
    ("log.eval_every", _int_at_least(0), "an integer >= 0 (0: validation only at the end)"),
    ("log.eval_batches", _int_at_least(1), "an integer >= 1"),
    ("log.checkpoint_every", _int_at_least(1), "an integer >= 1"),
    ("log.keep_checkpoints", _int_at_least(1), "an integer >= 1 (older checkpoints beyond it are deleted)"),
    ("mesh.data", _devices, "-1 (the remaining devices) or an integer >= 1"),
    ("mesh.fsdp", _devices, "-1 (the remaining devices) or an integer >= 1"),
    ("mesh.num_devices", _devices, "-1 (every device) or an integer >= 1"),
    ("mesh.sequence", _int_at_least(1), "an integer >= 1 (devices that split each sequence)"),
)


def _batch_multiple(c):
    if c.train.batch_size % c.train.micro_batch_size:
        return (f"train.batch_size={c.train.batch_size} must be a multiple of "
                f"train.micro_batch_size={c.train.micro_batch_size}")


def _one_free_mesh_axis(c):
    if c.mesh.data == -1 and c.mesh.fsdp == -1:
        return "only one of mesh.data and mesh.fsdp may be -1"


def _sequence_split(c):
    sequence, attn = c.mesh.get("sequence", 1), c.model.attn
    if sequence <= 1:
        return None
    if c.data.seq_len % sequence or ({attn} if isinstance(attn, str) else set(attn)) != {"gla"}:
        return (f"mesh.sequence={sequence} needs data.seq_len (now {c.data.seq_len}) a multiple of it "
                f"and every layer GLA (model.attn={c.model.attn!r})")
    if c.model.get("pos_embedding"):  # each slice would read positions from 0: not implemented
        return f"mesh.sequence={sequence} needs model.pos_embedding=False (slices carry no position offset)"


def _model(c):
    try:
        model = model_config(c)
    except (TypeError, ValueError) as error:
        return str(error)
    if model.uses_pos_embedding and c.data.seq_len > model.block_size:
        return (f"data.seq_len={c.data.seq_len} exceeds model.block_size={model.block_size} "
                "(the position embedding's length)")
    layers = zip(model.per_layer("attn"), model.per_layer("expand_k"), model.per_layer("expand_v"))
    for layer, (kind, expand_k, expand_v) in enumerate(layers):
        widths = (model.n_embd,) if kind == "softmax" else (int(model.n_embd * expand_k), int(model.n_embd * expand_v))
        if any(w == 0 or w % model.n_head for w in widths):
            return (f"layer {layer} ({kind}): the key/value widths {widths} (model.n_embd={model.n_embd} times "
                    f"model.expand_k/expand_v) must be multiples of model.n_head={model.n_head}")


COMBINATIONS: tuple[Callable, ...] = (_batch_multiple, _one_free_mesh_axis, _model, _sequence_split)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming every setting that cannot work, before any data or device is touched."""
    problems = []
    for key, test, requirement in RULES:
        section, name = key.split(".")
        if section in config and name in config[section]:
            value = config[section][name]
            if not test(value):
                problems.append(f"{key}={value!r} must be {requirement}")
    if not problems:
        problems = [p for p in (check(config) for check in COMBINATIONS) if p]
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems) + " (fix the config file or its --config.KEY=VALUE)")


def config_changes(saved: Path, config: ml_collections.ConfigDict, limit: int = 5) -> str:
    """The keys whose values differ between a run's saved config.json and `config`, as 'key old -> new'."""
    try:
        old = _flatten(json.loads(Path(saved).read_text()))
    except (OSError, ValueError):
        return ""
    new = _flatten(json.loads(config.to_json_best_effort()))
    keys = sorted(old.keys() | new.keys(), key=lambda k: (not k.startswith("model."), k))  # the model first
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(changed[:limit]) + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


# -------------------------------------------------------------------------------------- command line
# ml_collections cannot override a list from the command line; these keys take a comma-separated string
# or a Python list literal instead, applied after the flags are parsed.
LIST_KEYS = ("data.sources",)


def split_list_overrides(argv: list[str], flag: str = "config") -> tuple[list[str], dict[str, list[str]]]:
    """(argv without `--config.KEY=VALUE` for LIST_KEYS, {KEY: the parsed list})."""
    rest, lists = [], {}
    args = iter(argv)
    for arg in args:
        key = arg[len(flag) + 3:].split("=", 1)[0] if arg.startswith(f"--{flag}.") else None
        if key in LIST_KEYS:
            value = arg.split("=", 1)[1] if "=" in arg else next(args, "")
            lists[key] = parse_list(key, value)
        else:
            rest.append(arg)
    return rest, lists


def parse_list(key: str, value: str) -> list[str]:
    """"['a', 'b']", "a,b" or "a" -> ['a', 'b'] / ['a']."""
    text = value.strip()
    if text[:1] in "[(":
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--config.{key}={value!r} is not a list literal; write it as "
                              f"--config.{key}=a,b or --config.{key}=\"['a', 'b']\"") from None
        items = [parsed] if isinstance(parsed, str) else list(parsed)
    else:
        items = text.split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def apply_list_overrides(config: ml_collections.ConfigDict, lists: dict[str, list[str]]) -> None:
    for key, value in lists.items():
        section, name = key.split(".")
        config[section][name] = value


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key as a dotted path, e.g. 'train.learning_rate'."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        keys += config_keys(value, path + ".") if isinstance(value, ml_collections.ConfigDict) else [path]
    return keys


def check_override_keys(config: ml_collections.ConfigDict, argv: list[str], flag: str = "config") -> None:
    """Fails at once on `--config.KEY=...` overrides whose KEY the config lacks, listing the valid keys."""
    valid = config_keys(config)
    for arg in argv:
        if arg.startswith(f"--{flag}."):
            key = arg[len(flag) + 3:].split("=", 1)[0]
            if key not in valid:
                raise ConfigError(
                    f"unknown config key '{key}' in {arg!r}. Valid keys:\n  " + "\n  ".join(valid)
                )
