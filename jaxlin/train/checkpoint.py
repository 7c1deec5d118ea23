"""Orbax checkpoints of the train state and the data iterator, with fallback past a broken newest one."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from jaxlin.errors import UserError

log = logging.getLogger(__name__)

UNREADABLE = "checkpoints_unreadable"  # beside checkpoints/: where unreadable checkpoints are moved


class CheckpointMismatchError(UserError, ValueError):
    """A readable checkpoint holds a train state of another structure, shape or dtype than this config's."""


class NoCheckpointError(UserError, FileNotFoundError):
    """There is no checkpoint to read."""


def array_layout(tree) -> dict[str, tuple[tuple, str]]:
    """{dotted path: (shape, dtype)} of a tree of arrays, abstract arrays or Orbax array metadata."""
    def name(path):
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return {name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def describe_difference(saved: dict, wanted: dict, limit: int = 3) -> str | None:
    """What differs between two array layouts, in words (None when they match)."""
    differences = [f"{k} is {_shape_dtype(saved[k])} there, {_shape_dtype(wanted[k])} here"
                   for k in wanted if k in saved and saved[k] != wanted[k]]
    differences += [f"{k} missing from the checkpoint" for k in wanted if k not in saved]
    differences += [f"{k} only in the checkpoint" for k in saved if k not in wanted]
    if not differences:
        return None
    more = f" (and {len(differences) - limit} more)" if len(differences) > limit else ""
    return "; ".join(differences[:limit]) + more


def _shape_dtype(layout: tuple) -> str:
    shape, dtype = layout
    return f"{dtype}{list(shape)}"


def first_line(error: Exception, limit: int = 300) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:limit]}"


class Checkpointer:
    """Saves {state, data iterator} every so often, keeps the newest `keep`, restores the newest readable one.

    A checkpoint that fails to restore is reported and moved aside to `<dir>/../checkpoints_unreadable/`
    (never deleted), and the previous one is used. One that reads but holds another tree of arrays, or arrays
    of other shapes or dtypes (another model or optimizer config, or an older jaxlin) is left in place and
    stops the run: it is not broken. `check_compatible` says so before anything else is read or written.
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

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def saved_layout(self, step: int) -> dict | None:
        """The array layout checkpoint `step` records, or None when its metadata cannot be read."""
        absl_log = logging.getLogger("absl")  # Orbax warns that the state's own step metadata is absent
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)
        try:
            metadata = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
            return array_layout(getattr(metadata, "item_metadata", metadata)) or None
        except Exception:  # unreadable: restoring it fails too, and that path reports it
            return None
        finally:
            absl_log.setLevel(level)

    def check_compatible(self, abstract_state, hint: str = "") -> None:
        """Raises CheckpointMismatchError when the newest checkpoint whose metadata reads holds another
        train state than `abstract_state` (structure, shapes or dtypes). Reads metadata only."""
        wanted = array_layout(abstract_state)
        for step in self.steps():
            saved = self.saved_layout(step)
            if saved is not None:
                self._raise_if_different(step, saved, wanted, hint)
                return

    def _raise_if_different(self, step, saved, wanted, hint):
        difference = describe_difference(saved, wanted)
        if difference:
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.directory} holds another train state than this config's: "
                f"{difference}.{hint} Nothing was changed. Continue it with the settings that wrote it, "
                f"or train in a new --workdir.")

    def restore_latest(self, abstract_state, data_iterator):
        """(state, step) from the newest readable checkpoint, or (None, 0) when there is none.

        The data iterator's position is restored in place."""
        for step in self.steps():
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                            data=grain.checkpoint.CheckpointRestore(data_iterator)),
                )
            except Exception as error:  # any unreadable file: report, set aside, fall back
                self._mismatch_or_unreadable(step, abstract_state, error)
                self._set_aside(step, error)
                continue
            return restored["state"], step
        return None, 0

    def restore_state_only(self, abstract_state):
        """(state, step) from the newest readable checkpoint's train state (no data iterator); unreadable
        ones are reported and skipped, not moved. Raises NoCheckpointError when none reads."""
        steps = self.steps()
        for step in steps:
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            except Exception as error:
                self._mismatch_or_unreadable(step, abstract_state, error)
                log.warning("checkpoint %d in %s is unreadable (%s); trying the previous one",
                            step, self.directory, first_line(error))
                continue
            return restored["state"], step
        found = f"none of its {len(steps)} checkpoints reads" if steps else "it holds no checkpoint"
        raise NoCheckpointError(f"nothing to export from {self.directory}: {found}. Train first "
                                "(same --config and --workdir).")

    def _mismatch_or_unreadable(self, step, abstract_state, error):
        saved = self.saved_layout(step)
        if saved is not None:
            self._raise_if_different(step, saved, array_layout(abstract_state), "")
        if "tree structures do not match" in str(error):  # Orbax's words for a readable mismatch
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.directory} holds another train state than this config's "
                f"({first_line(error)}). Nothing was changed. Continue it with the settings that wrote it, "
                "or train in a new --workdir.") from error

    def _set_aside(self, step: int, error: Exception) -> None:
        target = self.directory.parent / UNREADABLE / f"{step}-{int(time.time())}"
        log.warning("checkpoint %d in %s is unreadable (%s); moving it to %s and trying the previous one",
                    step, self.directory, first_line(error), target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), target)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
