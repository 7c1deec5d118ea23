"""Train a model: python train.py --config configs/NAME.py --workdir DIR [--config.a.b=value ...]"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Run folder: checkpoints, metrics, export. Rerun to resume.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (default: $JAXLIN_DATA_DIR, ../shared/data, "
                                "or the user cache filled by `python -m jaxlin.data.download`).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-host run: call jax.distributed.initialize() first "
                                  "(it reads the coordinator and process ids from the cluster's environment).")
_EXPORT_ONLY = flags.DEFINE_bool("export_only", False, "Export the newest checkpoint to WORKDIR/export and stop.")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax reports every save at INFO
    import jax

    from jaxlin.train import loop  # after flag parsing: keeps --help fast
    from jaxlin.train.config import apply_xla_flags

    config = _CONFIG.value
    apply_xla_flags(config)
    if _DISTRIBUTED.value:
        jax.distributed.initialize()

    if _DATA_DIR.value:
        config.data.data_dir = _DATA_DIR.value
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
    try:
        check_override_keys(runpy.run_path(path or "configs/tiny.py")["get_config"](), argv)
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_config_keys(sys.argv)
    app.run(main)
