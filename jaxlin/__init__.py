"""jaxlin: GPT-2-style language models with linear attention in JAX."""
