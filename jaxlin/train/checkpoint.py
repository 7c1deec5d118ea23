"""Orbax checkpoints of the train state and the data iterator, with fallback past a broken newest one."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The newest checkpoint holds a train state of another shape than this config's."""


class Checkpointer:
    """Saves {state, data iterator} every so often, keeps the newest `keep`, restores the newest readable one.

    A checkpoint that fails to restore is reported and moved aside to `<dir>/../checkpoints_unreadable/`
    (never deleted), and the previous one is used. One that reads but holds another tree of arrays (another
    model or optimizer config, or an older jaxlin) is left in place and stops the run: it is not broken.
    """

    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=grain.checkpoint.CheckpointSave(data_iterator)),
            force=force,
        )

    def restore_latest(self, abstract_state, data_iterator):
        """(state, step) from the newest readable checkpoint, or (None, 0) when there is none.

        The data iterator's position is restored in place."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                            data=grain.checkpoint.CheckpointRestore(data_iterator)),
                )
            except Exception as error:  # any unreadable file: report, set aside, fall back
                if "tree structures do not match" in str(error):  # Orbax's words for a readable mismatch
                    raise CheckpointMismatchError(
                        f"checkpoint {step} in {self.directory} holds a different train state from this config's "
                        f"(another model or optimizer setting, or an older jaxlin); nothing was moved. Resume it "
                        f"with the config and version that wrote it, or train in a new --workdir. Orbax: "
                        f"{str(error)[:600]}") from error
                self._set_aside(step, error)
                continue
            return restored["state"], step
        return None, 0

    def restore_state_only(self, abstract_state):
        """The newest checkpoint's train state (no data iterator), or None when there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

    def _set_aside(self, step: int, error: Exception) -> None:
        target = self.directory.parent / "checkpoints_unreadable" / f"{step}-{int(time.time())}"
        log.warning("checkpoint %d in %s is unreadable (%s: %s); moving it to %s and trying the previous one",
                    step, self.directory, type(error).__name__, error, target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), target)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
