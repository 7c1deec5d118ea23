"""The softmax baseline: nanoGPT's GPT-2 Medium with learned position embeddings, same data and schedule."""

from configs import gpt2_medium_gla


def get_config():
    c = gpt2_medium_gla.get_config()
    c.model.update(attn="softmax", pos_embedding=True)
    return c
