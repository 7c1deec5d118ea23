"""The reference run: GPT-2 Medium (24 layers, 16 heads, width 1024) with GLA in every block.

As the PyTorch reference (nanoGPT + FLA GatedLinearAttention): expand_k 0.5 (key head dim 32), expand_v 1
(value head dim 64), short conv 4, swish output gate, forget gate logsigmoid(.)/16, no position embedding;
FineWeb 10B, 13,535 steps of 512 x 1024 tokens. Point data.sources at llm.c's FineWeb shards
(e.g. --config.data.sources="['/data/fineweb10B']"); the default is the shipped corpus.
"""

from jaxlin.train.config import default_config


def get_config():
    c = default_config()
    c.model.update(n_layer=24, n_head=16, n_embd=1024, block_size=1024, attn="gla", expand_k=0.5, expand_v=1.0,
                   conv_size=4, dtype="bfloat16",
                   # Keeps matmul outputs and the element-wise activations that feed them: 35 GiB at micro-batch 32,
                   # 4 % faster than "dots" (22 GiB); no remat needs 48 (docs/benchmarks.md).
                   remat="dots_and_activations")
    c.data.update(seq_len=1024, sources=["train_corpus", "train_corpus_extra"], val_fraction=0.005)
    c.train.update(steps=13_535, batch_size=512, micro_batch_size=32, learning_rate=3e-4, warmup_steps=700,
                   min_lr_ratio=0.1, weight_decay=0.1, beta2=0.95, grad_clip=1.0,
                   # half as many float32 passes over the head's accumulated gradient as 2048: 1.7 ms a step
                   # faster on an H200 for 0.3 GiB (docs/benchmarks.md)
                   loss_chunk=4096,
                   # cuBLAS for every product: XLA's Triton GEMMs for the fused ones cost 2 ms a step on an H200
                   xla_flags="--xla_gpu_enable_triton_gemm=false")
    c.log.update(every=10, eval_every=250, eval_batches=20, checkpoint_every=500)
    return c
