"""`small_gla` with softmax attention and learned position embeddings: the real run's baseline."""

from configs import small_gla


def get_config():
    c = small_gla.get_config()
    c.model.update(attn="softmax", pos_embedding=True)
    return c
