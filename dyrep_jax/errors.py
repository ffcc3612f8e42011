"""The expected errors: what a user can fix from the message alone.

`python -m dyrep_jax.main` prints these as one or two lines and exits 1
(`--verbosity=1` or DYREP_TRACEBACK=1 adds the traceback); any other
exception is a bug and keeps its traceback. Each message says what is wrong
and what to do.
"""

from __future__ import annotations

from dyrep_jax.data.errors import DataError


class ConfigError(ValueError):
    """A config value that cannot work (bad range, unknown field, devices that do not divide)."""


class WorkdirError(RuntimeError):
    """The workdir cannot be used: a file, read only, or holding another run."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, written, or does not belong to this config."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """Evaluation or export asked for a checkpoint where there is none."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or parameters)."""


# what `main` reports without a traceback (WorkdirLockedError is a WorkdirError)
EXPECTED_ERRORS = (ConfigError, DataError, WorkdirError, CheckpointError, TrainingError)
