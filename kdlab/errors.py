"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class KdlabError(Exception):
    """A problem with the user's input (recipe, files, layer names, shapes) rather than a bug."""


class ConfigError(KdlabError):
    """An invalid recipe key, type or value."""


class DataError(KdlabError):
    """A missing, truncated or malformed data file."""


class CheckpointError(KdlabError):
    """A missing, corrupt or untrusted checkpoint or weights file."""


class LayerError(KdlabError):
    """A tapped layer name that does not exist, or tapped shapes that do not fit together."""


class NonFiniteLoss(KdlabError):
    """A loss (the main loop's or a pre-stage's) turned NaN or infinite."""
