"""Errors caused by what a user gave us; command-line entry points print them without a traceback."""


class UserError(Exception):
    """Bad input (a file, a question, a config value, a checkpoint): the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""
