"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class LmforgeError(Exception):
    """Base of every error whose message is meant for the user, not for a debugger."""


class ConfigError(LmforgeError):
    """A config file or override is wrong: names the key and the file."""


class DataError(LmforgeError):
    """Input data is missing, empty or malformed: names the file, line or column."""


class TrackingError(LmforgeError):
    """The MLflow tracking store cannot be reached or used."""


class TrainingError(LmforgeError):
    """Training stopped: divergence, a failed training process, a bad checkpoint."""


class StageError(LmforgeError):
    """A stage ended without the outputs it promises, or its child process failed."""


class RegistryError(LmforgeError):
    """A registered model, version or alias is not where a command looks for it."""
