"""User-facing errors.

Anything a user can cause (a missing file, a wrong shape, a wrong checkpoint, a wrong flag) is raised
as an :class:`IDQLError` subclass whose message is one line naming what was expected, what was found
and where. The CLI prints that line to stderr and exits non-zero; ``IDQL_CM_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations


class IDQLError(Exception):
    """Base class of the errors a user can cause; the message is shown as one line."""

    exit_code = 2


class DataError(IDQLError):
    """A dataset file or id that cannot be read as expected (path, key, shape, values)."""


class CheckpointError(IDQLError):
    """A checkpoint that is missing, corrupt, of the wrong kind or incompatible with its partner."""


class ConfigError(IDQLError):
    """A configuration value or command-line flag that cannot work."""


class NonFiniteError(IDQLError):
    """A NaN or Inf in a loss, gradient or observation where training cannot go on."""
