"""Errors a user causes (a setting, a file, a folder): the command lines print their message as one line.

Each subclass also derives from the built-in type callers already expect (ValueError, FileNotFoundError,
...), so code that catches those keeps working.
"""


class UserError(Exception):
    """A problem with what the user asked for or gave; the message says what, where and the fix."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work, named by its dotted key."""


class DataError(UserError, ValueError):
    """A data file that cannot be used as it is, named by its path."""


class ExportError(UserError, ValueError):
    """An export directory whose files cannot be read or do not match each other."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named, or one a folder they named must hold, is not there."""
