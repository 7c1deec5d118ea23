"""Device mesh, logical axis names and the rules that map them to mesh axes: the one place for sharding.

Mesh axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (data parallelism with
parameters and optimizer state sharded, gathered per use by XLA) split the batch; `sequence` splits each
sequence (context parallelism: GLA layers run `jaxlin.ops.context_parallel`). Every parameter gets logical axis
names from PARAM_AXES by its path; LOGICAL_RULES maps names to mesh axes.
"""

from __future__ import annotations

import re
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

# `sequence` first: the outermost axis spans the slowest links (across hosts), and split sequences exchange
# only small states while data and fsdp move gradients and parameters. (XLA also needs nested manual axes
# in mesh order: the step's shard_map over sequence holds the loss's over fsdp.)
MESH_AXES = ("sequence", "data", "fsdp")
LOGICAL_RULES = {
    "batch": ("data", "fsdp"),  # activations: the batch is split over every device
    "embed": "fsdp",  # parameters: the model width is split over the fsdp axis
    "vocab": None,
    "mlp": None,
    "heads": None,
    "conv": None,
    "norm": None,
}
# Logical axes of each parameter, by a regular expression on its path ("h/3/attn/q_proj/kernel").
PARAM_AXES = (
    (r"^wte$", ("vocab", "embed")),
    (r"^wpe$", (None, "embed")),
    (r"mlp/c_fc/kernel$", ("embed", "mlp")),
    (r"mlp/c_proj/kernel$", ("mlp", "embed")),
    (r"attn/(o_proj|c_proj)/kernel$", ("heads", "embed")),
    (r"attn/([qkvg]_proj|c_attn)/kernel$", ("embed", "heads")),
    (r"attn/gk_down/kernel$", ("embed", None)),
    (r"attn/gk_up/kernel$", (None, "heads")),
    (r"attn/[ab]_proj/kernel$", ("embed", None)),
    (r"attn/conv/[qkv]/kernel$", ("conv", "heads")),
    (r"(bias|scale|weight|A_log|dt_bias)$", ("norm",)),
    (r"amax_history$", (None,)),  # FP8 scaling state (jaxlin.layers.fp8)
)


def make_mesh(mesh_config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    devices = jax.devices()
    if mesh_config.num_devices != -1:
        if not 1 <= mesh_config.num_devices <= len(devices):
            raise ValueError(f"mesh.num_devices={mesh_config.num_devices}: {len(devices)} devices are present")
        devices = devices[: mesh_config.num_devices]
    n = len(devices)
    data, fsdp, sequence = mesh_config.data, mesh_config.fsdp, mesh_config.get("sequence", 1)
    if (data == -1) + (fsdp == -1) > 1:
        raise ValueError("only one of mesh.data and mesh.fsdp may be -1")
    if sequence < 1 or n % sequence:
        raise ValueError(f"mesh.sequence={sequence} must divide the {n} devices present")
    if data == -1:
        data = n // sequence // fsdp
    if fsdp == -1:
        fsdp = n // sequence // data
    if data * fsdp * sequence != n or data < 1 or fsdp < 1:
        raise ValueError(f"mesh.data={mesh_config.data} x mesh.fsdp={mesh_config.fsdp} x mesh.sequence={sequence} "
                         f"must multiply to the {n} devices present")
    return jax.make_mesh((sequence, data, fsdp), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def path_string(path) -> str:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join(p for p in parts if p not in (".value", "value"))


def logical_axes(path: str, ndim: int) -> tuple:
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    raise ValueError(f"no logical axes for parameter '{path}' ({ndim}-D): add a rule to PARAM_AXES")


def logical_to_spec(axes: tuple, shape: tuple, mesh) -> P:
    """Mesh axes for `axes`; a dimension the mesh axis does not divide stays replicated."""
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = LOGICAL_RULES.get(name) if name else None
        names = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        spec.append(mesh_axes if names and size % ways == 0 and ways > 1 else None)
    return P(*spec)


def param_specs(params, mesh):
    """Each parameter's PartitionSpec under `mesh` (an abstract mesh will do)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: logical_to_spec(logical_axes(path_string(path), x.ndim), x.shape, mesh), params)


def param_shardings(params, mesh):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh))


def state_sharding(state, mesh):
    """Shardings of a TrainState: parameters by the rules; optimizer moments like their parameters."""
    by_shape_and_path = {}
    params = param_shardings(state.params, mesh)
    for path, s in jax.tree_util.tree_flatten_with_path(params)[0]:
        by_shape_and_path[path_string(path)] = s
    replicated = NamedSharding(mesh, P())

    def opt_leaf(path, x):
        p = path_string(path)
        for param_path, s in by_shape_and_path.items():
            if p.endswith(param_path) and x.ndim == len(s.spec):
                return s
        return replicated

    return type(state)(step=replicated, params=params,
                       opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state))


def batch_sharding(mesh, accumulate: bool = True) -> NamedSharding:
    """Batches are [accumulation, micro_batch, T] (train) or [batch, T] (eval); the batch axis is split, and
    the time axis over `sequence`."""
    batch = LOGICAL_RULES["batch"]
    return NamedSharding(mesh, P(None, batch, "sequence") if accumulate else P(batch, "sequence"))


def check_batch(micro_batch_size: int, mesh) -> None:
    ways = int(np.prod([mesh.shape[a] for a in LOGICAL_RULES["batch"]]))
    if micro_batch_size % ways:
        raise ValueError(f"train.micro_batch_size={micro_batch_size} must be a multiple of the {ways} devices "
                         f"that split the batch")


def global_batch(batch: dict, spec: NamedSharding) -> dict:
    """This process's share of a batch -> global arrays laid out by `spec`."""
    return {k: multihost_utils.host_local_array_to_global_array(v, spec.mesh, spec.spec) for k, v in batch.items()}


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
