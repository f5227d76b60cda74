"""Errors a user can fix. The CLI prints their message on one line, never a stack trace."""


class ConsistentDiffusionError(Exception):
    """Base class: the message names the bad value and what is accepted."""


class ConfigError(ConsistentDiffusionError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


class ModelNotFoundError(ConsistentDiffusionError, FileNotFoundError):
    """A model spec names nothing we can load (missing path, hub id offline)."""


class ImageInputError(ConsistentDiffusionError, ValueError):
    """An input image is missing, corrupt or unusable."""
