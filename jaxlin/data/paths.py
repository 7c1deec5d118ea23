"""Where the data lives: the one place that decides the data directory.

Order: an explicit argument (the `--data_dir` flag), then `$JAXLIN_DATA_DIR`, then `../shared/data`
beside the repository when it exists, else a per-user cache that `python -m jaxlin.data.download` fills.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxlin.errors import UserError

ENV_VAR = "JAXLIN_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FETCH_COMMAND = "python -m jaxlin.data.download"


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxlin" / "data"


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Returns the data directory to use (it may not exist yet: `require` reports that)."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser().resolve()
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    return user_cache_dir()


class MissingDataError(UserError, FileNotFoundError):
    """A data file is absent; the message names the file, the folder searched and the fix."""


def require(data_dir: str | os.PathLike | None, relpath: str) -> Path:
    """Path of `relpath` inside the data directory, or a MissingDataError that says how to get it."""
    root = resolve_data_dir(data_dir)
    path = root / relpath
    if not path.exists():
        raise MissingDataError(
            f"missing data file '{relpath}' in data directory '{root}'. "
            f"Fetch it with `{FETCH_COMMAND} --data_dir {root}`, or point --data_dir / ${ENV_VAR} "
            f"at a folder that holds it."
        )
    return path
