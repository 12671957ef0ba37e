"""Errors that mean "what you gave is wrong", as opposed to a bug in the code.

The command line (`topk_lightning.cli.main`) prints the message of an :class:`InputError` as one line on stderr and
exits with status 2, without a traceback; ``TOPK_LIGHTNING_DEBUG=1`` shows the traceback as well. Any other exception
is a programming error and keeps its traceback. Messages name the file, field, example id or option at fault and
what was expected.
"""

from __future__ import annotations

__all__ = ["InputError", "MissingFileError"]


class InputError(ValueError):
    """A bad data file, option value, model directory or checkpoint path given by the user.

    A ``ValueError``, so code that catches ``ValueError`` still catches it.
    """


class MissingFileError(InputError, FileNotFoundError):
    """A file named by the user does not exist (also a ``FileNotFoundError``)."""
