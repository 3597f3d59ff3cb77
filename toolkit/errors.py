"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

import difflib
from typing import Iterable


class EdgetuneError(Exception):
    """A problem the user can fix; the message names what is wrong and the fix."""


class DataError(EdgetuneError):
    """The dataset cannot be used as given (no images, one class, an empty class, ...)."""


class RunDirError(EdgetuneError):
    """A run directory is missing, half-written, or from an incompatible version."""


class DeviceError(EdgetuneError):
    """A device was asked for that this machine does not have."""


def unknown_choice(kind: str, name: str, valid: Iterable[str], *, where: str = "") -> EdgetuneError:
    """`Unknown format 'onxx'. Did you mean 'onnx'? Available: onnx, onnx-int8, ...`"""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return EdgetuneError(f"Unknown {kind} '{name}'{where}.{hint} Available: {', '.join(valid)}.")
