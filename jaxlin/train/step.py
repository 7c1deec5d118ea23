"""The train state and the jitted step: gradient accumulation, Optax update, metrics."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlin.model import GPT
from jaxlin.train.loss import chunked_cross_entropy


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (skipped non-finite steps included)
    params: Any  # nnx.State of the model's Params, float32 master weights
    opt_state: Any


def create_train_state(model: GPT, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def loss_fn(params, graphdef: nnx.GraphDef, batch: dict, loss_chunk: int):
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(batch["inputs"], segment_ids=batch.get("segment_ids"))
    return chunked_cross_entropy(hidden, model.wte[...], batch["targets"], chunk=loss_chunk)


def train_step(state: TrainState, batch: dict, *, graphdef, optimizer, loss_chunk: int):
    """One optimizer step over `batch` laid out as [accumulation, micro_batch, T] arrays."""
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(grad_sum, micro_batch):
        loss, grads = grad_fn(state.params, graphdef, micro_batch, loss_chunk)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    accum = jax.tree.leaves(batch)[0].shape[0]
    if accum == 1:  # no loop: saves a zero-filled gradient buffer and a pass adding into it
        loss, grads = grad_fn(state.params, graphdef, jax.tree.map(lambda x: x[0], batch), loss_chunk)
        losses = loss[None]
    else:
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grad_sum, losses = jax.lax.scan(micro_step, zeros, batch)
        grads = jax.tree.map(lambda g: g / accum, grad_sum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": jnp.mean(losses),
        "grad_norm": opt_state.grad_norm,
        "nonfinite_in_a_row": opt_state.notfinite_count,
        "nonfinite_total": opt_state.total_notfinite,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, graphdef, loss_chunk: int):
    return loss_fn(params, graphdef, batch, loss_chunk)
