"""Exceptions raised by rosim. Every one says what was wrong and what to do."""


class RosimError(Exception):
    """Base class of rosim's errors."""


class InputError(RosimError, ValueError):
    """A caller passed something rosim cannot use (bad text, bad shape, bad option)."""


class CheckpointError(InputError):
    """A checkpoint is missing, corrupt, or does not match its configuration.

    A checkpoint is something the caller hands rosim, so this is bad input (CLI exit status 2).
    """


class DataError(InputError):
    """A data file is malformed; the message names the file and the line."""
