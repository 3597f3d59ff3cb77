"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class EdgetuneError(Exception):
    """A problem the user can fix; the message names what is wrong and the fix."""


class DataError(EdgetuneError):
    """The dataset cannot be used as given (no images, one class, an empty class, ...)."""


class RunDirError(EdgetuneError):
    """A run directory is missing, half-written, or from an incompatible version."""


class DeviceError(EdgetuneError):
    """A device was asked for that this machine does not have."""
