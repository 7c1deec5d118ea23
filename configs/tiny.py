"""The embedded default: a small GLA model on the shipped corpus; a few minutes on 2 CPU cores."""

from jaxlin.train.config import default_config


def get_config():
    c = default_config()
    c.model.update(n_layer=2, n_head=2, n_embd=64, block_size=128, dtype="float32")
    c.data.seq_len = 128
    c.train.update(steps=300, batch_size=4, micro_batch_size=4, learning_rate=3e-3, warmup_steps=30)
    c.log.update(every=10, eval_every=100, eval_batches=4, checkpoint_every=100)
    return c
