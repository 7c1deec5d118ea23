import os

# Two emulated CPU devices for the multi-device tests; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# On the CPU the tests spend most of their time in XLA's compiler, and its optimisations at these tiny shapes
# buy nothing: skipping them about halves a compile. Programs started by tests (train.py) compile as usual.
if os.environ["JAX_PLATFORMS"] == "cpu":
    jax.config.update("jax_disable_most_optimizations", True)
