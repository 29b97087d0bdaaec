"""User-facing errors: the CLI prints these as one clear message, never as a traceback."""


class UserError(Exception):
    """A mistake in the user's input or configuration; the message says what and where."""


class DataError(UserError, ValueError):
    """Bad data: names the file, the record and the field when it can."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; names the key."""
