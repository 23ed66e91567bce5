"""Errors a user can act on: each names the file, row or id that is wrong and what was expected."""


class KsegError(Exception):
    """Base class of every error kseg raises on purpose."""


class DataError(KsegError, ValueError):
    """Bad input data: corrupt image, mask of the wrong size, overlapping instances, missing id.

    ``path`` is the offending file (or id) so batch jobs can report and skip it.
    """

    def __init__(self, message: str, path: object = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class RLEError(DataError):
    """A run-length string that does not decode strictly (names the row/id when known)."""


class ConfigError(KsegError, ValueError):
    """A configuration value that is missing, unknown or out of range."""
