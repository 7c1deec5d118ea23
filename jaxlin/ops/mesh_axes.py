"""Which axes of the current mesh split the batch: the kernels run per batch shard over them."""

import jax


def batch_axes() -> tuple:
    """The current mesh's axes of more than one device that split the batch (all but `sequence`) and are not
    manual yet (a computation inside `shard_map` over some axes may still split its rows over the others)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in mesh.axis_names if a not in mesh.manual_axes and a != "sequence" and mesh.shape[a] > 1)
