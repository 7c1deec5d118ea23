"""GPT-2 Medium GLA at 8,192-token context: the reference model on sequences 8x longer.

Same model (no position embedding, so no length limit) and the same 524,288 tokens per optimizer step
as gpt2_medium_gla: 64 sequences of 8,192 in micro-batches of 4 (32,768 tokens each, as the 1,024-token
run's micro-batch of 32). Documents are packed across window boundaries; set
--config.data.reset_state_at_eot=True to restart the recurrence at every <|endoftext|>.
"""

from configs import gpt2_medium_gla

SEQ_LEN = 8192


def get_config():
    c = gpt2_medium_gla.get_config()
    c.model.update(block_size=SEQ_LEN)
    c.data.update(seq_len=SEQ_LEN)
    c.train.update(batch_size=64, micro_batch_size=4)
    return c
