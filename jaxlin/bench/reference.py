"""Time the PyTorch reference's train step: nanoGPT blocks with FLA's GatedLinearAttention.

    python -m jaxlin.bench.reference [--steps 10] [--micro_batch 32] [--seq_len 1024] [--compile] [--json out.json]

The model that configs/gpt2_medium_gla.py mirrors: 24 pre-LayerNorm blocks of width 1024, each FLA's
``fla.layers.GatedLinearAttention`` (16 heads, expand_k 0.5, expand_v 1, short convs of width 4, swish output
gate fused with the RMSNorm, gate logits over 16) then a GELU MLP of 4x the width without biases; no position
embeddings; the head tied to the embedding, whose vocabulary is padded to 50,304 (354,401,792 parameters).
Random tokens, bf16 autocast, gradient clipping at 1 and fused AdamW, one micro-batch a step. It prints and
writes the keys of ``jaxlin.bench.train_step``, so that both can stand side by side in one table
(``scripts/gpu_check.sh reference train`` runs both on one GPU).

Needs PyTorch with CUDA and FLA 0.6 (``pip install torch flash-linear-attention``), which jaxlin itself does
not depend on.
"""

from __future__ import annotations

import os
import time

from absl import flags

from jaxlin.bench.common import parse, report

FLAGS = flags.FlagValues()
flags.DEFINE_integer("steps", 10, "Timed steps, after two warm-up steps.", flag_values=FLAGS)
flags.DEFINE_integer("micro_batch", 32, "Sequences a step.", flag_values=FLAGS)
flags.DEFINE_integer("seq_len", 1024, "Tokens a sequence.", flag_values=FLAGS)
flags.DEFINE_integer("n_layer", 24, "Blocks.", flag_values=FLAGS)
flags.DEFINE_integer("n_embd", 1024, "Width.", flag_values=FLAGS)
flags.DEFINE_integer("n_head", 16, "GLA heads.", flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", 50304, "Embedding rows (GPT-2's 50,257 padded to a multiple of 64).",
                     flag_values=FLAGS)
flags.DEFINE_bool("compile", False, "Run the model under torch.compile.", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results here.", flag_values=FLAGS)

INSTALL = "pip install torch flash-linear-attention (FLA 0.6.x, with a CUDA build of PyTorch)"
EXPECTED_PARAMS = 354_401_792  # at the defaults


def _gpt(torch, GatedLinearAttention, *, vocab_size, n_layer, n_embd, n_head):
    """The reference model as a ``torch.nn.Module``: ``model(tokens, targets)`` returns the mean loss."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.ln_1 = nn.LayerNorm(n_embd)
            self.attn = GatedLinearAttention(mode="chunk", hidden_size=n_embd, expand_k=0.5, expand_v=1.0,
                                             num_heads=n_head, use_short_conv=True, conv_size=4, gate_fn="swish",
                                             gate_logit_normalizer=16, norm_eps=1e-5, layer_idx=layer)
            self.ln_2 = nn.LayerNorm(n_embd)
            self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
            self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))[0]  # FLA's layer returns (output, attentions, cache)
            return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab_size, n_embd)
            self.h = nn.ModuleList(Block(i) for i in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd)

        def forward(self, tokens, targets):
            x = self.wte(tokens)
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.t()  # the tied head
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return GPT()


def bench(steps: int, micro_batch: int, seq_len: int, n_layer: int, n_embd: int, n_head: int, vocab_size: int,
          compile_model: bool = False) -> dict:
    try:
        import torch
        from fla.layers import GatedLinearAttention
    except ImportError as e:
        raise SystemExit(f"error: jaxlin.bench.reference needs PyTorch and FLA ({e}); {INSTALL}") from None
    if not torch.cuda.is_available():
        raise SystemExit(f"error: jaxlin.bench.reference needs a CUDA GPU; torch sees none ({INSTALL})")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = _gpt(torch, GatedLinearAttention, vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd,
                 n_head=n_head).cuda()
    params = sum(p.numel() for p in model.parameters())  # the tied weight once
    matrix_params = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    forward = torch.compile(model) if compile_model else model
    tokens = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), device="cuda")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Warm-up: FLA's Triton kernels autotune on their first call (minutes on a fresh machine), then compile.
    for i in range(2):
        begin = time.perf_counter()
        step()
        torch.cuda.synchronize()
        print(f"warm-up step {i + 1}: {time.perf_counter() - begin:.1f} s", flush=True)
    start = time.perf_counter()
    for _ in range(steps):  # queued back to back, as jaxlin.bench.train_step chains its steps
        step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) * 1e3 / steps
    results = {"model": "PyTorch nanoGPT + fla.layers.GatedLinearAttention", "params": params,
               "micro_batch": micro_batch, "seq_len": seq_len, "device": torch.cuda.get_device_name(),
               "compile": compile_model, "step_ms": step_ms, "tokens_per_s": micro_batch * seq_len / (step_ms / 1e3),
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    results.update(_mfu(results, matrix_params, n_layer, n_embd, n_head, seq_len))
    return results


def _mfu(results: dict, matrix_params: int, n_layer: int, n_embd: int, n_head: int, seq_len: int) -> dict:
    """The FLOP count and MFU as jaxlin.train.flops counts them for the same model."""
    from jaxlin.train.flops import PEAK_BF16_FLOPS, attention_flops_per_token
    forward = 2.0 * matrix_params + n_layer * attention_flops_per_token("gla", n_embd, n_head, 0.5, 1.0, seq_len)
    out = {"train_flops_per_token": 3.0 * forward}
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in results["device"]), None)
    if peak:
        out["mfu"] = results["tokens_per_s"] * out["train_flops_per_token"] / peak
    return out


def main(argv=None):
    parse(FLAGS, argv, __doc__)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jaxlin.train.flops imports jax
    results = bench(FLAGS.steps, FLAGS.micro_batch, FLAGS.seq_len, FLAGS.n_layer, FLAGS.n_embd, FLAGS.n_head,
                    FLAGS.vocab_size, FLAGS.compile)
    print(f"{'params':>16}: {results['params']:,}")
    if (FLAGS.n_layer, FLAGS.n_embd, FLAGS.n_head, FLAGS.vocab_size) == (24, 1024, 16, 50304) and \
            results["params"] != EXPECTED_PARAMS:
        print(f"warning: {results['params']:,} parameters, expected {EXPECTED_PARAMS:,}: this FLA version's "
              "GatedLinearAttention differs from the one jaxlin mirrors")
    report(results, FLAGS.json)


if __name__ == "__main__":
    main()
