"""The exceptions that end the program with a one-line message and exit status 2.

They live here, in a module that imports nothing heavy, so the command line can
report a configuration or path mistake before TensorFlow is loaded.
"""

from __future__ import annotations


class UserFacingError(Exception):
    """A problem the user can fix; the message says what happened and what to do."""


class ConfigError(UserFacingError, ValueError):
    """A mistake in experiment.json or on the command line."""


class DataError(UserFacingError):
    """A data problem (missing path, no usable images, a split that does not match the data)."""


class EvaluationError(UserFacingError, RuntimeError):
    """Nothing to evaluate (no checkpoint) or the checkpoint does not fit the data."""


class TrainingError(UserFacingError, RuntimeError):
    """Training cannot go on (NaN loss, an unclear or corrupt run folder, a locked run)."""


class StorageError(UserFacingError, OSError):
    """A file could not be written or read (disk full, permission denied); earlier files are intact."""


class Terminated(BaseException):
    """SIGTERM arrived: stop like Ctrl-C (the last completed epoch is kept)."""


class CheckpointError(UserFacingError):
    """A checkpoint file is corrupt or unreadable, or a run folder is in a state that needs a decision."""


class LockError(UserFacingError):
    """A run folder is in use by another process, or cannot be locked at all."""


class WorkerLost(TrainingError):
    """A worker of a multi-worker run died or stopped answering; the collective runtime is aborted."""
