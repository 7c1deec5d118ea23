"""Flax NNX attention layers: GLA, DeltaNet, Gated DeltaNet and the softmax baseline."""

from jaxlin.layers.deltanet import DeltaNet, GatedDeltaNet
from jaxlin.layers.gla import GatedLinearAttention
from jaxlin.layers.softmax import CausalSelfAttention

ATTENTION_KINDS = {
    "gla": GatedLinearAttention,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "softmax": CausalSelfAttention,
}
RECURRENT_KINDS = ("gla", "deltanet", "gated_deltanet")

__all__ = ["ATTENTION_KINDS", "RECURRENT_KINDS", "CausalSelfAttention", "DeltaNet", "GatedDeltaNet",
           "GatedLinearAttention"]
