"""The training config's schema and defaults; experiment files in configs/ start from `default_config()`."""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections

from jaxlin.model import PER_LAYER_FIELDS, ModelConfig


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
        shards_dir="",  # "" -> a cache folder keyed by the sources
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


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key for settings that cannot work together."""
    t = config.train
    if t.batch_size % t.micro_batch_size:
        raise ValueError(
            f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size={t.micro_batch_size}"
        )
    if t.steps < 1 or t.warmup_steps < 0:
        raise ValueError("train.steps must be >= 1 and train.warmup_steps >= 0")
    if config.data.seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {config.data.seq_len}")
    model = model_config(config)
    sequence = config.mesh.get("sequence", 1)
    if sequence > 1 and (config.data.seq_len % sequence or set(model.per_layer("attn")) != {"gla"}):
        raise ValueError(f"mesh.sequence={sequence} needs data.seq_len (now {config.data.seq_len}) a multiple of it "
                         f"and every layer GLA (model.attn={model.attn!r})")
    if model.uses_pos_embedding and config.data.seq_len > model.block_size:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.block_size={model.block_size}")


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
                raise ValueError(
                    f"unknown config key '{key}' in {arg!r}. Valid keys:\n  " + "\n  ".join(valid)
                )
