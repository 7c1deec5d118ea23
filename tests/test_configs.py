"""Every experiment config builds a valid model config; the depth-adaptive and hybrid layouts are as specified."""

import os
import runpy
from pathlib import Path

import pytest

from jaxlin.train.config import model_config, validate

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid(path):
    config = runpy.run_path(str(path))["get_config"]()
    validate(config)


def load(name):
    return model_config(runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"))["get_config"]())


def test_depth_adaptive_expand_k():
    ks = load("gpt2_medium_gla_depth_adaptive").expand_k
    assert ks[0] == 0.5 and ks[-1] == 1.0 and len(ks) == 24
    assert all(a <= b for a, b in zip(ks, ks[1:])) and all((k * 8).is_integer() for k in ks)


def test_hybrid_alternates():
    attn = load("gpt2_medium_hybrid").attn
    assert attn[:4] == ("gated_deltanet", "gla", "gated_deltanet", "gla") and len(attn) == 24


def test_reference_run_schedule():
    c = runpy.run_path(str(CONFIGS[0].parent / "gpt2_medium_gla.py"))["get_config"]()
    assert (c.train.steps, c.train.batch_size * c.data.seq_len, c.train.micro_batch_size) == (13_535, 512 * 1024, 32)


def test_small_real_run_size():
    from flax import nnx

    from jaxlin.model import GPT, count_params
    gla, softmax = load("small_gla"), load("small_softmax")
    n = count_params(nnx.eval_shape(lambda: GPT(gla, rngs=nnx.Rngs(0))))
    assert 20e6 <= n <= 50e6  # the real run: a 20-50M parameter model
    assert (softmax.attn, softmax.n_layer, softmax.n_embd) == ("softmax", gla.n_layer, gla.n_embd)


def test_xla_flags_go_before_the_environments(monkeypatch):
    """The config's flags are prepended: XLA takes the last of repeated flags, so the environment's win."""
    from jax._src import xla_bridge

    from jaxlin.train.config import apply_xla_flags, default_config
    config = default_config()
    config.train.xla_flags = "--xla_gpu_enable_triton_gemm=false"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    apply_xla_flags(config)
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false --xla_force_host_platform_device_count=2"


def test_xla_flags_after_a_backend_started_are_refused_loudly(monkeypatch, caplog):
    from jax._src import xla_bridge

    from jaxlin.train.config import apply_xla_flags, default_config
    config = default_config()
    config.train.xla_flags = "--xla_gpu_enable_triton_gemm=false"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    apply_xla_flags(config)
    assert os.environ["XLA_FLAGS"] == "" and "not applied" in caplog.text
