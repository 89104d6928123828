"""Errors effsr raises for bad input: each message names the file or option and what to do."""


class EffSRError(ValueError):
    """Base class of effsr's user-facing errors."""


class DataError(EffSRError):
    """A dataset folder or image file cannot be used as it is."""


class ConfigError(EffSRError):
    """A configuration value is inconsistent or unknown."""


class CheckpointError(EffSRError):
    """A checkpoint cannot be read or does not fit the model."""


class TrainingError(EffSRError):
    """Training cannot go on (e.g. a non-finite loss)."""
