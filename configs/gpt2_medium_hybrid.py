"""The alternating hybrid: Gated DeltaNet on even layers (head dims 64/64), GLA on odd layers (32/64)."""

from configs import gpt2_medium_gla


def get_config():
    c = gpt2_medium_gla.get_config()
    n = c.model.n_layer
    c.model.attn = tuple("gated_deltanet" if i % 2 == 0 else "gla" for i in range(n))
    c.model.expand_k = tuple(1.0 if i % 2 == 0 else 0.5 for i in range(n))
    return c
