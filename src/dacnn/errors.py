"""User-facing errors: the CLI prints their message and exits non-zero without a traceback."""


class DacnnError(Exception):
    """Bad input (file, field or value) that the user can fix; the message names it."""


class DataError(DacnnError):
    """A dataset file is missing, corrupt or inconsistent."""


class ConfigError(DacnnError):
    """A configuration value or flag is invalid."""


class CheckpointError(DacnnError):
    """A checkpoint is missing, unreadable or does not match the model."""


class WriteError(DacnnError, OSError):
    """A file could not be written (read-only place, full disk); the message names the file."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


class RunInUse(DacnnError):
    """Another process is training in the run directory (it holds the run's lock)."""


class RunFinished(DacnnError):
    """``--resume`` of a run that has trained all its epochs."""
