"""`small_gla` at 8,192-token context: a short long-context run on the shipped corpus.

Same model and the same 32,768 tokens per step as small_gla (4 sequences of 8,192 instead of 32 of
1,024); 500 steps are 16.4M tokens, about one pass over the 18.1M-token training split.
`small_softmax_8k` is its softmax twin.
"""

from configs import small_gla

SEQ_LEN = 8192


def get_config():
    c = small_gla.get_config()
    c.model.update(block_size=SEQ_LEN)
    c.data.update(seq_len=SEQ_LEN)
    c.train.update(steps=500, batch_size=4, micro_batch_size=4, warmup_steps=50)
    c.log.update(every=10, eval_every=100, eval_batches=5, checkpoint_every=500)
    return c
