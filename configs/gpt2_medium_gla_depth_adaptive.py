"""Depth-adaptive GLA: expand_k rises linearly from 0.5 at the first layer to 1.0 at the last, in eighths."""

from configs import gpt2_medium_gla


def get_config():
    c = gpt2_medium_gla.get_config()
    n = c.model.n_layer
    c.model.expand_k = tuple(round((0.5 + 0.5 * i / (n - 1)) * 8) / 8 for i in range(n))
    return c
