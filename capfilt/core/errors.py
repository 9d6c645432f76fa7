"""Exceptions capfilt raises on purpose, so the CLI can tell a user's mistake from a bug."""


class ConfigError(ValueError):
    """A configuration or input the user can fix; the message says what to change."""


class StageFailed(RuntimeError):
    """A stage ran but could not finish within its failure budget; the message names the shards."""
