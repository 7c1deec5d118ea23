import jax
import pytest

from tests.kernels.kernel_checks import ON_GPU


@pytest.fixture(autouse=True, scope="module")
def _quick_cpu_compiles():
    """Interpret mode spends its time in XLA's CPU compiler; skipping its optimisations halves that."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", not ON_GPU)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
