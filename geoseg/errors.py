"""Exception hierarchy: every user-facing failure is a GeosegError.

Each child also derives from the builtin that fits (ValueError, OSError, ...)
so callers that do not know geoseg can still catch them sensibly. Messages are
one line: the file or value at fault, the problem, and the fix.
"""

from __future__ import annotations

import os
from typing import TypeVar


class GeosegError(Exception):
    """Root of all geoseg errors; cli.py turns these into one-line messages."""


class ConfigError(GeosegError, ValueError):
    """A configuration key, type or value is wrong."""


class InputFileError(GeosegError, OSError):
    """An input file is missing, unreadable, truncated or of the wrong kind."""


class GeoreferenceError(GeosegError, ValueError):
    """CRS or transform missing, or two grids that should match do not."""


class LabelError(GeosegError, ValueError):
    """Labels with disallowed values or a grid that does not match the image."""


class DatasetError(GeosegError, ValueError):
    """A dataset folder that yields nothing usable, or pairs that do not match."""


class OutputError(GeosegError, OSError):
    """An output that exists without overwrite, or a folder that cannot be written."""


class ModelError(GeosegError, ValueError):
    """Unknown architecture or encoder, or weights that do not fit the model."""


class CheckpointError(GeosegError, ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the scene or run."""


E = TypeVar("E", bound=GeosegError)


def file_error(cls: type[E], path: str | os.PathLike[str], problem: str, fix: str) -> E:
    """Build an error whose message names the file, the problem and the fix.

    Args:
        cls: The GeosegError subclass to instantiate.
        path: The file at fault.
        problem: What is wrong, e.g. ``"has no CRS"``.
        fix: What the user should do, e.g. ``"pass --assume-crs EPSG:32633"``.

    Returns:
        An instance of ``cls`` with the message ``"PATH: problem; fix"``.
    """
    return cls(f"{os.fspath(path)}: {problem}; {fix}")
