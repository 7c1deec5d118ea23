"""Generation with a fixed-size state: prefill through the training ops, then token-by-token decoding of
every attention kind (recurrent state, or a KV cache for softmax layers) in jitted loops.

    from jaxlin.generate import Generator, Sampling, generate, generate_text, load_model
"""

from jaxlin.generate.cache import decode_step, for_decoding, forward, init_cache, prefill
from jaxlin.generate.loop import Generator, generate
from jaxlin.generate.sampling import GREEDY, Sampling
from jaxlin.generate.text import generate_text, load_model

__all__ = ["GREEDY", "Generator", "Sampling", "decode_step", "for_decoding", "forward", "generate",
           "generate_text", "init_cache", "load_model", "prefill"]
