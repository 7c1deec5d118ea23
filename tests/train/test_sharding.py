"""Data parallel, FSDP and split sequences on 2 emulated CPU devices: same losses as 1 device, rule-based shardings, resharding restore."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlin.model import GPT
from jaxlin.train import loop, sharding
from jaxlin.train.config import model_config
from jaxlin.train.optimizer import make_optimizer
from jaxlin.train.step import create_train_state
from tests.train.test_train import losses, tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py emulates them)")
STEPS = {"train.steps": 4, "log.eval_every": 0, "log.checkpoint_every": 2}


def mesh_config(data, fsdp, num_devices):
    return {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.num_devices": num_devices}


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shards")


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, shards_dir):
    workdir = tmp_path_factory.mktemp("one")
    loop.run(tiny_config(shards_dir, **STEPS, **mesh_config(1, 1, 1)), workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("data, fsdp", [(2, 1), (1, 2)], ids=["data_parallel", "fsdp"])
def test_two_devices_match_one(tmp_path, shards_dir, one_device, data, fsdp):
    loop.run(tiny_config(shards_dir, **STEPS, **mesh_config(data, fsdp, 2)), tmp_path)
    a, b = losses(one_device), losses(tmp_path)
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=2e-5)


@pytest.mark.slow
def test_sequences_split_over_two_devices_match_one(tmp_path, shards_dir, one_device):
    """Context parallelism: each sequence's two halves on two devices (GLA exchanges states, convs a halo)."""
    loop.run(tiny_config(shards_dir, **STEPS, **mesh_config(1, 1, 2), **{"mesh.sequence": 2}), tmp_path)
    a, b = losses(one_device), losses(tmp_path)
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=2e-5)


def test_parameter_shardings_follow_the_rules():
    config = tiny_config("unused", **mesh_config(1, 2, 2))
    mesh = sharding.make_mesh(config.mesh)
    optimizer = make_optimizer(config.train)
    _, state = create_train_state(nnx.eval_shape(lambda: GPT(model_config(config), rngs=nnx.Rngs(0))), optimizer)
    shardings = sharding.state_sharding(state, mesh)
    params = shardings.params
    assert params["wte"].spec == P(None, "fsdp")  # (vocab, embed)
    assert params["h"][0]["mlp"]["c_fc"]["kernel"].spec == P("fsdp", None)  # (embed, mlp)
    assert params["h"][0]["mlp"]["c_proj"]["kernel"].spec == P(None, "fsdp")  # (mlp, embed)
    assert params["h"][0]["attn"]["q_proj"]["kernel"].spec == P("fsdp", None)  # (embed, heads)
    assert params["h"][0]["ln_1"]["scale"].spec == P(None)  # norms stay replicated
    # Adam's moments are sharded like their parameters.
    specs = {sharding.path_string(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]}
    assert any(path.endswith("mu/h/0/mlp/c_fc/kernel") and spec == P("fsdp", None) for path, spec in specs.items())
    dp = sharding.state_sharding(state, sharding.make_mesh(tiny_config("unused", **mesh_config(2, 1, 2)).mesh))
    assert all(s.spec == P(*([None] * len(s.spec))) for s in jax.tree.leaves(dp.params))


@pytest.mark.slow
def test_save_on_two_devices_restore_on_one(tmp_path, shards_dir):
    two = tiny_config(shards_dir, **STEPS, **mesh_config(1, 2, 2))
    loop.run(two, tmp_path / "two")
    shutil.copytree(tmp_path / "two", tmp_path / "moved")
    # Continue the FSDP run's checkpoint on one device, and the same on two devices, for two more steps.
    loop.run(tiny_config(shards_dir, **{**STEPS, "train.steps": 6}, **mesh_config(1, 1, 1)), tmp_path / "moved")
    loop.run(tiny_config(shards_dir, **{**STEPS, "train.steps": 6}, **mesh_config(1, 2, 2)), tmp_path / "two")
    a, b = losses(tmp_path / "moved"), losses(tmp_path / "two")
    assert [s for s, _ in a] == list(range(1, 7))
    np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=2e-5)
    assert json.loads((tmp_path / "moved" / "config.json").read_text())["mesh"]["num_devices"] == 1
