"""The run folder: an exclusive lock, so two runs never interleave their checkpoints, metrics and export, and
an earlier run's outputs set aside (never overwritten) when a run starts afresh."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

import jax

from jaxlin.errors import UserError

LOCK_FILE = "run.lock"


class WorkdirLockedError(UserError, RuntimeError):
    """Another live process holds the run folder."""


class WorkdirLock:
    """Holds `WORKDIR/run.lock` (an flock, with the holder's pid and host written in it) for a `with` block.

    The operating system drops the lock when its process ends, however it ends (kill -9 included), so a lock
    whose process is gone is stale and taken over silently. Only process 0 of a multi-host job takes it.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_FILE
        self.fd = None

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() != 0:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkdirLockedError(
                f"run folder {self.path.parent} is in use by {holder}: wait for that run to end (or stop it), "
                f"or give another --workdir. The lock ({self.path}) frees itself when that process exits."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


OUTPUTS = ("config.json", "metrics.jsonl", "tb", "loss.png", "export")  # what a run writes besides checkpoints
PREVIOUS = "previous"


def set_aside_outputs(workdir: str | os.PathLike) -> Path | None:
    """Moves the outputs already in `workdir` (an earlier run's, or files that were there before) to
    `WORKDIR/previous/TIME/` before a fresh start writes its own; returns that folder, or None when there
    was nothing to move."""
    workdir = Path(workdir)
    found = [workdir / name for name in OUTPUTS if (workdir / name).exists()]
    if not found:
        return None
    target = workdir / PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():
        target = target.with_name(target.name + "+")
    target.mkdir(parents=True)
    for path in found:
        shutil.move(str(path), target / path.name)
    return target
