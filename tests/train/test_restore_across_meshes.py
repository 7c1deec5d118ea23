"""A run moved across meshes (1 device -> 2 data parallel -> 4 FSDP), resuming from its checkpoints, continues
the loss sequence of the same run on one device. In a process of its own with 4 emulated devices."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.train.test_train import REPO

WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from jaxlin.train import loop
    from tests.train.test_train import losses, tiny_config

    shards, moved, reference = sys.argv[1:4]
    common = {"log.eval_every": 0, "log.checkpoint_every": 2, "train.batch_size": 8, "train.micro_batch_size": 4}
    def config(steps, data, fsdp, devices):
        return tiny_config(shards, **common, **{"train.steps": steps, "mesh.data": data, "mesh.fsdp": fsdp,
                                                "mesh.num_devices": devices})
    # train.steps sets the learning-rate schedule, so the reference stops and resumes at the same steps.
    for steps, data, fsdp, devices in ((2, 1, 1, 1), (4, 2, 1, 2), (6, 1, 4, 4)):
        loop.run(config(steps, data, fsdp, devices), moved)
        loop.run(config(steps, 1, 1, 1), reference)
    a, b = losses(moved), losses(reference)
    assert [s for s, _ in a] == list(range(1, 7)), a
    np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=2e-5)
""")


@pytest.mark.slow
def test_checkpoints_continue_across_meshes(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "shards"), str(tmp_path / "moved"),
                           str(tmp_path / "reference")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
