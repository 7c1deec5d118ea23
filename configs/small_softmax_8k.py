"""`small_gla_8k` with softmax attention (cuDNN's fused kernel on GPU) and learned positions up to 8,192."""

from configs import small_gla_8k


def get_config():
    c = small_gla_8k.get_config()
    c.model.update(attn="softmax", pos_embedding=True, attention_impl="auto")
    return c
