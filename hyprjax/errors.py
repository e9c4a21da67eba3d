"""User-facing errors: one line that names the file, field or value at fault.

`HyprjaxError` subclasses ValueError so library callers can catch the usual type; the CLI
catches it (and OSError) and prints the message alone with exit code 2, never a traceback.
"""


class HyprjaxError(ValueError):
    """A bad input from the user: a file, a config field, a request."""


class ModelFileError(HyprjaxError):
    """A model file or directory that is missing, truncated or not what it claims to be."""


class ConfigError(HyprjaxError):
    """A config field that is missing or out of range."""


class PromptTooLongError(HyprjaxError):
    """A prompt (plus the tokens asked for) that does not fit the context."""
