"""The collectives of the compiled train step on 2, 4 and 8 emulated CPU devices, pinned.

GPT-2 Medium GLA's widths at 2 layers (sequence 128, micro-batch 8, 2 micro-batches a step). Each device count
runs in its own process: the count is fixed when JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from jax.sharding import PartitionSpec as P

from jaxlin.train import collectives

from tests.train.test_train import REPO

ACCUMULATION = 2
# One process per device count: compiles each layout and prints its collectives and parameter sizes as JSON.
WORKER = textwrap.dedent("""
    import dataclasses, json, runpy, sys
    import jax
    from jaxlin.train import collectives
    layouts = json.loads(sys.argv[1])
    out = {}
    for name, mesh in layouts.items():
        config = runpy.run_path("configs/gpt2_medium_gla.py")["get_config"]()
        config.model.update(n_layer=2, block_size=128)
        config.data.seq_len = 128
        config.train.update(micro_batch_size=8, batch_size=8 * %d, loss_chunk=512)
        config.mesh.update(num_devices=-1, **mesh)
        found = collectives.step_collectives(config)
        out[name] = [dataclasses.asdict(c) for c in found]
    print("RESULT" + json.dumps(out))
""" % ACCUMULATION)


def compile_layouts(devices: int, layouts: dict) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(layouts)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return {name: [collectives.Collective(**c) for c in found] for name, found in json.loads(line[6:]).items()}


@pytest.fixture(scope="module")
def sizes():
    """float32 bytes: all parameters, the embedding, and each block's matrices split over `fsdp`."""
    import runpy

    import jax
    from flax import nnx

    from jaxlin.model import GPT
    from jaxlin.train import sharding
    from jaxlin.train.config import model_config

    config = runpy.run_path(str(REPO / "configs" / "gpt2_medium_gla.py"))["get_config"]()
    config.model.update(n_layer=2, block_size=128)
    params = nnx.state(nnx.eval_shape(lambda: GPT(model_config(config), rngs=nnx.Rngs(0))), nnx.Param)
    fsdp_mesh = jax.sharding.AbstractMesh((1, 2), ("data", "fsdp"))
    specs = jax.tree.leaves(sharding.param_specs(params, fsdp_mesh), is_leaf=lambda x: isinstance(x, P))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    total = sum(x.size * 4 for _, x in flat)
    embedding = next(x.size * 4 for path, x in flat if sharding.path_string(path) == "wte")
    block_matrices = sum(x.size * 4 for (path, x), spec in zip(flat, specs)
                         if sharding.path_string(path).startswith("h/") and "fsdp" in spec)
    return {"params": total, "embedding": embedding, "block_matrices": block_matrices}


def per_step(found, kind, in_loop=None):
    return sum(c.bytes * c.count for c in found if c.kind == kind and (in_loop is None or c.in_loop == in_loop))


HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[16]{0} all-gather(%x), channel_id=3, replica_groups=[1,2]<=[2], dimensions={0}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %ar = (f32[8]{0}, bf16[4,4]{1,0}) all-reduce(%x, %y), channel_id=1, to_apply=%add
  %w = (s32[], f32[8]{0}) while(%p), condition=%cond, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %rs = f32[4]{0} reduce-scatter(%x), channel_id=2, replica_groups={{0,1}}, dimensions={0}, to_apply=%add
  ROOT %o = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_parse_hlo_counts_loop_trips_and_tuple_bytes():
    found = {c.kind: c for c in collectives.parse_hlo(HLO)}
    assert found["all-reduce"].bytes == 8 * 4 + 16 * 2 and found["all-reduce"].count == 4
    assert found["all-reduce"].in_loop
    assert found["all-gather"].bytes == 64 and found["all-gather"].count == 12  # 3 trips in each of 4
    assert found["reduce-scatter"].count == 1 and not found["reduce-scatter"].in_loop
    assert collectives.bytes_per_step(list(found.values())) == 64 * 4 + 64 * 12 + 16
    unknown = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
    with pytest.raises(ValueError, match="unknown trip count"):
        collectives.bytes_per_step(collectives.parse_hlo(unknown))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_data_parallel_and_fsdp_traffic(devices, sizes):
    layouts = {"data_parallel": {"data": devices, "fsdp": 1}, "fsdp": {"data": 1, "fsdp": devices}}
    if devices == 4:  # split sequences with FSDP: nested manual axes XLA must accept
        layouts["sequence_fsdp"] = {"data": 1, "fsdp": 2, "sequence": 2}
    found = compile_layouts(devices, layouts)
    dp, fsdp = found["data_parallel"], found["fsdp"]
    if devices == 4:
        assert {"collective-permute", "all-gather", "all-reduce"} <= {c.kind for c in found["sequence_fsdp"]}

    # Data parallel: the gradient is all-reduced once per optimizer step, never inside the accumulation loop,
    # and nothing else moves but a few scalars (the loss and the gradient norm's pieces).
    assert {c.kind for c in dp} == {"all-reduce"}
    assert not [c for c in dp if c.in_loop and c.bytes > 1024], "a reduction inside the accumulation loop"
    assert sizes["params"] <= per_step(dp, "all-reduce") <= sizes["params"] + 4096

    # FSDP: per micro-batch, each block's matrices are gathered (once more, hoisted before the loop, for
    # the forward), and the gradient is reduced once; the embedding is gathered once a step. On CPU the
    # reduction compiles to an all-reduce of the parameters' size (a reduce-scatter where XLA rewrites
    # all-reduce + slice, as on GPU): count either, by the bytes they read.
    gathers = per_step(fsdp, "all-gather")
    expected = sizes["embedding"] + (ACCUMULATION + 1) * sizes["block_matrices"]
    assert gathers <= expected * 1.01, f"{gathers / 1e6:.1f} MB gathered per step, expected {expected / 1e6:.1f}"
    assert gathers >= sizes["embedding"] + ACCUMULATION * sizes["block_matrices"]
    reduced = sum(c.operand_bytes * c.count for c in fsdp if c.kind in ("all-reduce", "reduce-scatter"))
    assert ACCUMULATION * sizes["params"] <= reduced <= ACCUMULATION * sizes["params"] + 8192
    # The embedding lookup's activations change layout (embedding width -> batch): B x T x width each way.
    token_bytes = 8 * 128 * 1024 * 4
    assert per_step(fsdp, "all-to-all") <= ACCUMULATION * token_bytes * 2 // devices * 1.01
    assert per_step(fsdp, "collective-permute") == 0


@pytest.mark.slow
def test_split_sequences_exchange_the_same_bytes_at_any_length():
    """mesh.sequence=2: the train step's collectives (GLA states and decays, conv halos, the gradient's
    reduction) are the same at 128 and 256 tokens."""
    import jax

    from tests.train.test_train import tiny_config

    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (tests/conftest.py emulates them)")

    def found(seq_len):
        config = tiny_config("unused", **{"mesh.data": 1, "mesh.sequence": 2, "mesh.num_devices": 2,
                                          "data.seq_len": seq_len, "model.block_size": seq_len})
        return Counter((c.kind, c.bytes, c.count) for c in collectives.step_collectives(config))

    short = found(128)
    assert short == found(256)
    assert not {kind for kind, _, _ in short} & {"all-to-all"}, short
