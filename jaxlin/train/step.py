"""The train state and the jitted step: gradient accumulation, Optax update, metrics."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlin.layers.fp8 import split_fp8_meta
from jaxlin.model import GPT
from jaxlin.train import sharding
from jaxlin.train.loss import chunked_cross_entropy


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (skipped non-finite steps included)
    params: Any  # nnx.State of the model's Params: float32 master weights, and any FP8 scaling state
    opt_state: Any  # of the weights only


def create_train_state(model: GPT, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    weights, _ = split_fp8_meta(params)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(weights))


def loss_fn(params, graphdef: nnx.GraphDef, batch: dict, loss_chunk: int):
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(batch["inputs"], segment_ids=batch.get("segment_ids"))
    return chunked_cross_entropy(hidden, model.wte[...], batch["targets"], chunk=loss_chunk)


def accumulate_grads(params, batch: dict, *, graphdef, loss_chunk: int, param_specs=None, loss_scale: float = 1.0):
    """(per-micro-batch losses, mean gradient) over `batch` [accumulation, micro_batch, T], on this device's rows.

    `param_specs`: each parameter's layout; the gradients and their running sum are constrained to it, so under
    FSDP the sum is held sharded like the parameters. The FP8 scaling state's gradients are its next values
    (jaxlin.layers.fp8): over micro-batches they combine by maximum (each adds its own amax to the same
    history), and they are not averaged. `loss_scale` multiplies the loss that is differentiated (not the
    losses returned): 1 / the number of groups whose gradients are summed, so that each token's output
    gradient, and the FP8 amax recorded from it, is the one-device value.
    """
    def scaled_loss(params, micro_batch):
        loss = loss_fn(params, graphdef, micro_batch, loss_chunk)
        return loss * loss_scale, loss

    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

    def grads_of(micro_batch):
        (_, loss), grads = grad_fn(params, micro_batch)
        return loss, grads if param_specs is None else jax.lax.with_sharding_constraint(grads, param_specs)

    accum = jax.tree.leaves(batch)[0].shape[0]
    if accum == 1:  # no loop: saves a zero-filled gradient buffer and a pass adding into it
        loss, grads = grads_of(jax.tree.map(lambda x: x[0], batch))
        return loss[None], grads

    def micro_step(grad_sum, micro_batch):
        loss, grads = grads_of(micro_batch)
        (sum_weights, sum_meta), (weights, meta) = split_fp8_meta(grad_sum), split_fp8_meta(grads)
        return nnx.merge_state(jax.tree.map(jnp.add, sum_weights, weights),
                               jax.tree.map(jnp.maximum, sum_meta, meta)), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    if param_specs is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, param_specs)
    grad_sum, losses = jax.lax.scan(micro_step, zeros, batch)
    weights, meta = split_fp8_meta(grad_sum)
    return losses, nnx.merge_state(jax.tree.map(lambda g: g / accum, weights), meta)


def train_step(state: TrainState, batch: dict, *, graphdef, optimizer, loss_chunk: int):
    """One optimizer step over `batch` laid out as [accumulation, micro_batch, T] arrays.

    Under a mesh with `data` or `sequence` axes each data-parallel group, and each slice of the sequences,
    accumulates its own gradient (`shard_map` over those axes; `fsdp` stays with the partitioner) and the
    gradients are averaged once per step: left to the partitioner, the gradient was all-reduced after every
    micro-batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    specs = None if mesh.empty else sharding.param_specs(state.params, mesh)
    accumulate = functools.partial(accumulate_grads, graphdef=graphdef, loss_chunk=loss_chunk, param_specs=specs)
    local = () if mesh.empty else tuple(a for a in ("data", "sequence") if mesh.shape.get(a, 1) > 1)
    if not local:
        losses, grads = accumulate(state.params, batch)
    else:
        groups = math.prod(mesh.shape[a] for a in local)

        def per_group(params, batch):
            losses, grads = accumulate(params, batch, loss_scale=1 / groups)
            weights, meta = split_fp8_meta(grads)
            return jax.lax.pmean(losses, local), nnx.merge_state(jax.lax.psum(weights, local),
                                                                 jax.lax.pmax(meta, local))

        # Each micro-batch's [batch, T] is split: rows over `data`, each sequence's tokens over `sequence`
        # (every device the same number of tokens, so the mean of the devices' means is the global mean).
        rows, tokens = ("data" if "data" in local else None), ("sequence" if "sequence" in local else None)
        # check_vma=False: the gradient inside stays this group's (no implicit reduction per micro-batch).
        losses, grads = jax.shard_map(per_group, in_specs=(P(), P(None, rows, tokens)), out_specs=(P(), P()),
                                      axis_names=set(local), check_vma=False)(state.params, batch)
    grads, new_meta = split_fp8_meta(grads)
    weights, meta = split_fp8_meta(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, weights)
    finite = opt_state.notfinite_count == 0  # a skipped step keeps the scaling state too
    params = nnx.merge_state(optax.apply_updates(weights, updates),
                             jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_meta, meta))
    metrics = {
        "loss": jnp.mean(losses),
        "grad_norm": opt_state.grad_norm,
        "nonfinite_in_a_row": opt_state.notfinite_count,
        "nonfinite_total": opt_state.total_notfinite,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, graphdef, loss_chunk: int):
    return loss_fn(params, graphdef, batch, loss_chunk)
