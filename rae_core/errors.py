"""Errors the platform reports to users as one line (exit code 2 for usage, 1 for runtime)."""


class RaeError(Exception):
    """A failure the user can act on; its message is one line naming the offending thing."""


class ConfigError(RaeError):
    """An invalid parameter: unknown key, wrong type or out-of-range value (a usage error)."""


class WeightsMissingError(RaeError):
    """Pretrained weights that must come from a local file are absent."""


class DataError(RaeError):
    """A dataset folder, image file, latent shard or statistics file is missing or invalid."""
