"""The softmax baseline: nanoGPT's GPT-2 Medium with learned position embeddings, same data and schedule.

On a GPU with bf16 its attention is cuDNN's fused flash attention (`attention_impl="auto"`, see
jaxlin.ops.attention), as nanoGPT uses PyTorch's fused scaled-dot-product attention; elsewhere XLA's.
"""

from configs import gpt2_medium_gla


def get_config():
    c = gpt2_medium_gla.get_config()
    c.model.update(attn="softmax", pos_embedding=True, attention_impl="auto")
    return c
