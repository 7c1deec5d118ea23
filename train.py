"""Train a model: python train.py --config configs/NAME.py --workdir DIR [--config.a.b=value ...]

A mistake in the settings, the data or the run folder prints one line (what, where, the fix) and exits
with status 1; `--verbose` (or JAXLIN_TRACEBACK=1) shows the traceback too.
"""

import logging
import os
import sys

from jaxlin.errors import UserError

DEFAULT_CONFIG = "configs/tiny.py"


def define_flags():
    """Defined only after argv is checked: ml_collections reads the --config.KEY overrides when defined."""
    from absl import flags
    from ml_collections import config_flags

    global _CONFIG, _WORKDIR, _DATA_DIR, _DISTRIBUTED, _EXPORT_ONLY, _DRY_RUN
    _CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file (configs/*.py).")
    _WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Run folder: checkpoints, metrics, export. Rerun to resume.")
    _DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: $JAXLIN_DATA_DIR, ../shared/data, "
                                    "or the user cache filled by `python -m jaxlin.data.download`).")
    _DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-host run: call jax.distributed.initialize() first "
                                     "(it reads the coordinator and process ids from the cluster's environment).")
    _EXPORT_ONLY = flags.DEFINE_bool("export_only", False, "Export the newest readable checkpoint to WORKDIR/export "
                                     "and stop.")
    _DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the settings, print the resolved config as JSON and stop "
                                 "(no data, device or run folder is touched).")
    flags.DEFINE_bool("verbose", False, "Show the traceback of errors too.")


def main(argv, list_overrides):
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax reports every save at INFO
    from jaxlin.train.config import apply_list_overrides, apply_xla_flags, validate

    config = _CONFIG.value
    apply_list_overrides(config, list_overrides)
    if _DATA_DIR.value:
        config.data.data_dir = _DATA_DIR.value
    validate(config)
    if _DRY_RUN.value:
        print(config.to_json_best_effort(indent=2))
        return
    apply_xla_flags(config)
    import jax

    from jaxlin.train import loop  # after flag parsing: keeps --help fast

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if _EXPORT_ONLY.value:
        loop.export_only(config, _WORKDIR.value)
    else:
        loop.run(config, _WORKDIR.value)


def check_config_keys(argv):
    """Unknown --config.KEY overrides fail before anything runs, with the list of valid keys."""
    import runpy

    from jaxlin.train.config import check_override_keys

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv:
        path = argv[argv.index("--config") + 1]
    path = (path or DEFAULT_CONFIG).split(":", 1)[0]  # ml_collections' "file.py:argument" form
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' does not exist: give --config configs/NAME.py "
                        f"(from the repository root)")
    check_override_keys(runpy.run_path(path)["get_config"](), argv)


def cli(argv: list[str]) -> None:
    from absl import app

    from jaxlin.train.config import split_list_overrides

    verbose = "--verbose" in argv or os.environ.get("JAXLIN_TRACEBACK", "") not in ("", "0")
    try:
        argv, list_overrides = split_list_overrides(argv)
        check_config_keys(argv)
        sys.argv = argv
        define_flags()
        app.run(lambda args: main(args, list_overrides), argv=argv)
    except UserError as error:
        if verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli(sys.argv)
