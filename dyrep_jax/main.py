"""Command line: `python -m dyrep_jax.main --config configs/X.py --workdir DIR [--mode ...]`.

--mode=train (default) trains or resumes; --mode=eval evaluates the latest
checkpoint and its fused form; --mode=export writes the fused deploy network.
Override any config field with --config.<field>=<value>.

Expected errors (a bad config value, bad data, an unusable workdir or
checkpoint, a NaN loss: `dyrep_jax.errors`) print one line and exit 1;
`--verbosity=1` or DYREP_TRACEBACK=1 adds their traceback. Any other error
prints its traceback. A failing run always exits, non-zero, even when
background checkpoint threads are stuck.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and the fused network")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "what to do")
flags.DEFINE_string("coordinator_address", None,
                    "multi-host: host:port of process 0 (else auto-detected on TPU VMs)")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.DEFINE_bool("distributed", False,
                  "call jax.distributed.initialize() (TPU VM pods: no other flag needed)")
flags.mark_flags_as_required(["config", "workdir"])


def setup_logging():
    """Today's quiet console unless absl's logging flags say otherwise.

    Default: our lines at INFO on stdout as `HH:MM:SS message`, libraries
    (absl, orbax, jax, tensorflow) at WARNING. `--verbosity=N` puts every
    logger at absl level N (-2 errors, -1 warnings, 0 info, 1 debug).
    `--log_dir=DIR` also writes absl's log file (dyrep_jax.INFO) into DIR.
    """
    from absl import logging as absl_logging

    quiet_default = not FLAGS["verbosity"].present  # (libraries set its value at import)
    level = logging.INFO if quiet_default else absl_logging.converter.absl_to_standard(
        max(min(FLAGS.verbosity, 1), -3))
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    for name in ("absl", "orbax", "jax", "tensorflow"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet_default else level)
    if FLAGS.log_dir:
        os.makedirs(FLAGS.log_dir, exist_ok=True)
        handler = absl_logging.get_absl_handler()
        handler.use_absl_log_file("dyrep_jax", FLAGS.log_dir)
        logging.getLogger().addHandler(handler)


def main(argv):
    """Run the command; on any error report it and leave at once with status 1."""
    del argv
    try:
        run_command()
    except BaseException as exc:  # noqa: BLE001 - every failure ends here, bounded
        code = report_error(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)  # skip joining orbax's threads: a failed save can leave them stuck


def report_error(exc: BaseException) -> int:
    """Print `exc` (one line if expected, else with its traceback); the exit status."""
    from dyrep_jax.errors import EXPECTED_ERRORS

    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    verbose = FLAGS.verbosity >= 1 or os.environ.get("DYREP_TRACEBACK", "") not in ("", "0")
    if isinstance(exc, EXPECTED_ERRORS) and not verbose:
        print(f"error: {exc}", file=sys.stderr)
        print("(--verbosity=1 or DYREP_TRACEBACK=1 shows the traceback)", file=sys.stderr)
    else:
        traceback.print_exception(exc)
    return 1


def load_config():
    """FLAGS.config, with a missing or broken config file as a ConfigError."""
    from dyrep_jax.errors import ConfigError

    config = FLAGS.config
    try:
        config.keys()  # a config that failed to load raises only when first used
    except OSError as exc:
        raise ConfigError(f"cannot load --config {FLAGS['config'].config_filename}: "
                          f"{str(exc).strip().splitlines()[-1].strip()}") from exc
    return config


def run_command():
    setup_logging()
    config = load_config()
    import jax

    from dyrep_jax import paths

    paths.fresh_listings()  # before the first gs:// access (see paths.py)
    try:
        paths.route_tensorboardx_through_epath()
    except ImportError:  # no tensorboardX: reporting.TensorBoard says so and writes nothing
        pass

    if FLAGS.distributed or FLAGS.coordinator_address:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    from dyrep_jax import evaluate, train

    log = logging.getLogger("dyrep_jax")
    log.info("devices: %d (%s), processes: %d", jax.device_count(),
             jax.devices()[0].platform, jax.process_count())
    if FLAGS.mode == "train":
        result = train.run(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        result = evaluate.evaluate_latest(config, FLAGS.workdir)
    else:
        result = evaluate.export_latest(config, FLAGS.workdir)
    log.info("done: %s", {k: v for k, v in result.items() if k != "structure"})


def check_overrides(argv) -> None:
    """Fail with one clear line on `--config.<field>` overrides that name no field."""
    import ml_collections

    from dyrep_jax.config_base import base_config

    base = base_config()
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        field = arg[len("--config."):].split("=", 1)[0]
        node = base
        for part in field.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = ", ".join(sorted(node.keys())) if isinstance(
                    node, ml_collections.ConfigDict) else "(none: not a group)"
                sys.exit(f"error: unknown config field '{field}' in {arg}; valid fields at "
                         f"'{part}': {valid}")
            node = node[part]


def entry():
    """The `dyrep-jax` console script: `python -m dyrep_jax.main`, with the same --help."""
    if sys.modules["__main__"] is not sys.modules[__name__]:
        sys.modules["__main__"].__doc__ = __doc__  # absl's --help prints __main__'s docstring
        for flag in FLAGS.get_key_flags_for_module(__name__):  # ...and the flags keyed to argv[0]
            FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    check_overrides(sys.argv[1:])
    app.run(main)


if __name__ == "__main__":
    entry()
