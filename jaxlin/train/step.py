"""The train state and the jitted step: gradient accumulation, Optax update, metrics."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlin.layers.fp8 import split_fp8_meta
from jaxlin.model import GPT
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


def train_step(state: TrainState, batch: dict, *, graphdef, optimizer, loss_chunk: int):
    """One optimizer step over `batch` laid out as [accumulation, micro_batch, T] arrays.

    The FP8 scaling state's gradients are its next values (jaxlin.layers.fp8): over micro-batches they
    combine by maximum (each adds its own amax to the same history), and they replace the old values
    unless the step is skipped as non-finite; the optimizer sees the weights only."""
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(grad_sum, micro_batch):
        loss, grads = grad_fn(state.params, graphdef, micro_batch, loss_chunk)
        (sum_weights, sum_meta), (weights, meta) = split_fp8_meta(grad_sum), split_fp8_meta(grads)
        return nnx.merge_state(jax.tree.map(jnp.add, sum_weights, weights),
                               jax.tree.map(jnp.maximum, sum_meta, meta)), loss

    accum = jax.tree.leaves(batch)[0].shape[0]
    if accum == 1:  # no loop: saves a zero-filled gradient buffer and a pass adding into it
        loss, grads = grad_fn(state.params, graphdef, jax.tree.map(lambda x: x[0], batch), loss_chunk)
        losses = loss[None]
    else:
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(micro_step, zeros, batch)
    grads, new_meta = split_fp8_meta(grads)
    if accum > 1:
        grads = jax.tree.map(lambda g: g / accum, grads)
    weights, meta = split_fp8_meta(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, weights)
    finite = opt_state.notfinite_count == 0
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
