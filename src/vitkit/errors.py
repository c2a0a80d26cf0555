"""vitkit's exceptions: each message says what was expected, what was found, and what to do.

They subclass the built-in exception a caller would expect (ValueError, FileNotFoundError), so plain
`except ValueError` keeps working; the CLI prints any of them as one line and exits non-zero.
"""


class VitkitError(Exception):
    """Base class of every error vitkit raises on purpose."""


class ConfigError(VitkitError, ValueError):
    """A bad option, flag or configuration value. `field` names the option (a config field name) when the message
    starts with it, so the CLI can name the flag that set it instead."""

    def __init__(self, message: str = "", field: str = ""):
        super().__init__(message)
        self.field = field


class DataError(VitkitError, ValueError):
    """Images or datasets that cannot be read or used."""


class CheckpointError(VitkitError, ValueError):
    """A checkpoint that is missing, corrupt, unsafe, or does not match the model."""


class RunExistsError(VitkitError, FileExistsError):
    """A run folder that exists already and would be overwritten."""
