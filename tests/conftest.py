import os

# Two emulated CPU devices for the multi-device tests; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# On the CPU the tests spend most of their time in XLA's compiler, and its optimisations at these tiny shapes
# buy nothing: skipping them about halves a compile. Programs started by tests (train.py) compile as usual.
ON_CPU = os.environ["JAX_PLATFORMS"] == "cpu"
if ON_CPU:
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True, scope="module")
def _compile_as_train_py(request):
    """A module whose in-process runs are compared bit for bit with train.py's (which compiles with XLA's
    optimisations) sets COMPILES_AS_TRAIN_PY = True: its programs are then optimised too."""
    if not (ON_CPU and getattr(request.module, "COMPILES_AS_TRAIN_PY", False)):
        yield
        return
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)
