"""The real-run GLA model: 6 layers, width 512, 44.7M parameters, on the shipped corpus.

Heads keep the reference's shape (8 heads, key dim 32, value dim 64). The corpus is 18.1M training
tokens, so 2,200 steps of 32 x 1024 tokens are four epochs; `small_softmax` is the same model with
softmax attention. Results and the command in README "Results".
"""

from jaxlin.train.config import default_config


def get_config():
    c = default_config()
    c.model.update(n_layer=6, n_head=8, n_embd=512, block_size=1024, attn="gla", expand_k=0.5, expand_v=1.0,
                   conv_size=4, dtype="bfloat16")
    c.data.update(seq_len=1024, sources=["train_corpus", "train_corpus_extra"], val_fraction=0.01)
    c.train.update(steps=2200, batch_size=32, micro_batch_size=32, learning_rate=1e-3, warmup_steps=200,
                   min_lr_ratio=0.1, weight_decay=0.1, beta2=0.95, grad_clip=1.0)
    c.log.update(every=20, eval_every=200, eval_batches=5, checkpoint_every=1000)
    return c
