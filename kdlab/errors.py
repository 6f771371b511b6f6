"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class KdlabError(Exception):
    """A problem with the user's input (recipe, files, layer names, shapes) rather than a bug."""


class ConfigError(KdlabError):
    """An invalid recipe key, type or value."""


class DataError(KdlabError):
    """A missing, truncated or malformed data file."""


class MissingDataRoot(DataError):
    """A data set that lives in files was asked for without saying where. The message names the way to give
    the root in the interface the user is in: ``root=`` in Python, ``--data-root`` on the command line."""

    def __init__(self, name: str, what: str, env: str | None = None, how: str = "root="):
        self.name, self.what, self.env = name, what, env
        super().__init__(self.passing(how))

    def passing(self, how: str) -> str:
        """The message with ``how`` as the way to give the root."""
        env = f" or set {self.env}" if self.env else ""
        return f"{self.name}: no data root given; pass {how} ({self.what}){env}"


class CheckpointError(KdlabError):
    """A missing, corrupt or untrusted checkpoint or weights file."""


class LayerError(KdlabError):
    """A tapped layer name that does not exist, or tapped shapes that do not fit together."""


class NonFiniteLoss(KdlabError):
    """A loss (the main loop's or a pre-stage's) turned NaN or infinite."""
