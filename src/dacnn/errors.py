"""User-facing errors: the CLI prints their message and exits non-zero without a traceback."""


class DacnnError(Exception):
    """Bad input (file, field or value) that the user can fix; the message names it."""


class DataError(DacnnError):
    """A dataset file is missing, corrupt or inconsistent."""


class ConfigError(DacnnError):
    """A configuration value or flag is invalid."""


class CheckpointError(DacnnError):
    """A checkpoint is missing, unreadable or does not match the model."""
