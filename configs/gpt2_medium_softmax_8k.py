"""The softmax twin of gpt2_medium_gla_8k: GPT-2 Medium with learned positions up to 8,192 and cuDNN's fused
flash attention on GPU. Its context is fixed: it cannot attend over more than block_size tokens."""

from configs import gpt2_medium_gla_8k


def get_config():
    c = gpt2_medium_gla_8k.get_config()
    c.model.update(attn="softmax", pos_embedding=True, attention_impl="auto")
    return c
